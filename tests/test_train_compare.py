"""bench/train_compare.sh: presets side by side on their cards, decoded at the last step they all have."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn_helpers import free_port
from trainer_helpers import TINY, prepare_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_presets_side_by_side_are_decoded_at_their_common_step(tmp_path):
    prepare_corpus(tmp_path / "data", train_utts=24, dev_utts=4)
    (tmp_path / "data" / "test").symlink_to(tmp_path / "data" / "dev")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CARDS": "0 0", "MASTER_PORT": str(free_port()), "DECODE_MODES": "ctc_greedy",
           "TRAIN_SET": " ".join(TINY + ["train.num_workers=0", "train.save_interval=2", "train.keep_checkpoints=5",
                                         "train.epoch_checkpoints=false", "train.max_eval_batches=1"])}
    script = ["bash", str(REPO / "bench" / "train_compare.sh"), str(tmp_path / "data"), str(out), "4",
              "tiny_dense", "tiny_moe"]

    def run(**extra: str) -> str:
        proc = subprocess.run(script, env={**env, **extra}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    run(DECODE_CHUNKS="none")
    for preset in ("tiny_dense", "tiny_moe"):
        assert (out / f"{preset}.metrics.jsonl").is_file() and "train wall" in (out / "summary.txt").read_text()
    # As if the MoE run's time limit had cut it after step 2: its step-4 checkpoint is gone.
    ckpts = out / "tiny_moe" / "checkpoints"
    assert {p.name for p in ckpts.glob("step_*")} >= {"step_00000002", "step_00000004"}
    for p in ckpts.glob("step_00000004*"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    summary = run(DECODE_ONLY="1", EQUAL_STEPS="1")
    assert "at its checkpoint step_00000002" in summary
    states = {}
    for preset in ("tiny_dense", "tiny_moe"):
        assert "model.pt from step_00000002" in (out / f"{preset}.export.log").read_text()
        states[preset] = _state(out / preset / "model.pt")
        hyps = (out / preset / "decode_test_chunk-1" / "ctc_greedy.txt").read_text().splitlines()
        assert len(hyps) == 4 and f"{preset} test, chunk -1" in summary
    assert summary.count("WER") == 2
    # The exports the script made are the ones `u2moe export --tag` makes directly, and step 2's
    # weights are not step 4's (the dense run still has both).
    for preset, tag, same in (("tiny_dense", "step_00000002", True), ("tiny_moe", "step_00000002", True),
                              ("tiny_dense", "step_00000004", False)):
        direct = tmp_path / f"{preset}_{tag}.pt"
        subprocess.run([sys.executable, "-m", "u2moe", "export", "--exp-dir", str(out / preset), "--out", str(direct),
                        "--tag", tag], check=True, capture_output=True)
        ref = _state(direct)
        assert (all(torch.equal(states[preset][k], ref[k]) for k in ref) and states[preset].keys() == ref.keys()) == same


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]

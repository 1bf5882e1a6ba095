"""Checkpoints a killed rank cannot leave half-valid, files that cannot run code on load, and
start-up refusals (one line, nothing written) for a user's mistakes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_helpers import child_env, prepare_corpus, run, train_command, train_losses


class Payload:
    """Unpickled, it would create `marker`: what an attacker plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory):
    """Two ranks, expert parallelism 2, ZeRO-2: a checkpoint after each of 3 steps."""
    root = tmp_path_factory.mktemp("two_ranks")
    extra = ["train.save_interval=1", "train.keep_checkpoints=10", "train.expert_parallel_size=2"]
    run(train_command(corpus, root / "exp", nproc=2, extra=[*extra, "train.max_steps=3"]), 600, root / "log")
    return root / "exp", extra


@pytest.fixture(scope="module")
def one_rank(corpus, tmp_path_factory):
    """One process, ZeRO-2: one checkpoint, after step 1."""
    root = tmp_path_factory.mktemp("one_rank")
    extra = ["train.expert_parallel_size=1"]
    run(train_command(corpus, root / "exp", nproc=1, extra=[*extra, "train.max_steps=1"]), 600, root / "log")
    return root / "exp", extra


def _copy(exp: Path, tmp_path: Path) -> Path:
    shutil.copytree(exp, tmp_path / "exp")
    return tmp_path / "exp"


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _refusal(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if "WARNING" not in line and "cpp_extension" not in line]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_a_file_takes_its_name_only_once_written_whole(tmp_path):
    from u2moe.trainer.checkpoint_files import write_atomic

    path = tmp_path / "rng_rank0.pt"
    write_atomic(path, lambda tmp: torch.save({"step": 1}, tmp))

    def dies_mid_write(tmp: Path) -> None:
        tmp.write_bytes(b"PK half a zip")
        raise KeyboardInterrupt  # the process killed here

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies_mid_write)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_resume_and_export_pass_over_checkpoints_a_killed_rank_left_incomplete(corpus, two_ranks, tmp_path):
    from u2moe.inference.model_file import load_model_file
    from u2moe.trainer.checkpoint import list_tags, read_fp32_weights

    exp = _copy(two_ranks[0], tmp_path)
    ckpt = exp / "checkpoints"
    first = train_losses(exp)
    manifest = json.loads((ckpt / "step_00000003" / "manifest.json").read_text())["files"]
    # Every rank's files: rank 1's optimizer partition, fp32 experts and random state too.
    assert {"fp32_ep1.pt", "rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(manifest)
    # Step 3: rank 1 killed while writing, before the manifest (fp32_ep1.pt half, no rng_rank1.pt).
    (ckpt / "step_00000003" / "manifest.json").unlink()
    _cut_in_half(ckpt / "step_00000003" / "fp32_ep1.pt")
    (ckpt / "step_00000003" / "rng_rank1.pt").unlink()
    # Step 2: a file that no longer matches its manifest.
    _cut_in_half(ckpt / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")

    proc = subprocess.run([sys.executable, "-m", "u2moe", "export", "--exp-dir", str(exp),
                           "--out", str(tmp_path / "model.pt")], capture_output=True, text=True, env=child_env())
    assert proc.returncode == 0 and "from step_00000001" in proc.stdout, proc.stderr[-3000:]
    passed = [line for line in proc.stderr.splitlines() if "incomplete" in line]
    assert len(passed) == 1 and "step_00000002" in passed[0] and "step_00000003" in passed[0]
    exported, _, _ = load_model_file(tmp_path / "model.pt")
    step1 = read_fp32_weights(ckpt / "step_00000001")
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, step1[name], rtol=0, atol=0, msg=name)

    log = tmp_path / "resumed.log"
    run(train_command(corpus, exp, nproc=2, extra=[*two_ranks[1], "train.max_steps=4"]), 600, log)
    text = log.read_text()
    passed = [line for line in text.splitlines() if "incomplete" in line]
    assert len(passed) == 1 and "step_00000002" in passed[0] and "step_00000003" in passed[0], text[-3000:]
    assert "resumed from step 1" in text
    # The steps the incomplete checkpoints held, trained again as the first time.
    again = train_losses(exp)
    for step in (2, 3):
        assert again[step]["loss"] == pytest.approx(first[step]["loss"], rel=1e-3), step
    assert list_tags(ckpt) == ["step_00000001", "step_00000002", "step_00000003", "step_00000004"]


@pytest.mark.parametrize("name", ["rng_rank0.pt", "fp32_ep0.pt", "mp_rank_00_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_code_planted_in_a_checkpoint_file_is_refused_unrun(corpus, one_rank, tmp_path, name):
    """An attacker who can write the checkpoint folder replaces a file (and its manifest entry):
    resume refuses it by name and runs nothing."""
    exp = _copy(one_rank[0], tmp_path)
    tag_dir = exp / "checkpoints" / "step_00000001"
    marker = tmp_path / "ran"
    torch.save({"state": Payload(marker)}, tag_dir / name)
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    manifest["files"][name] = (tag_dir / name).stat().st_size
    (tag_dir / "manifest.json").write_text(json.dumps(manifest))
    train_yaml = (exp / "train.yaml").read_bytes()

    proc = subprocess.run(train_command(corpus, exp, nproc=1, extra=[*one_rank[1], "train.max_steps=2"]),
                          capture_output=True, text=True, timeout=300, env=child_env())
    line = _refusal(proc)
    assert str(tag_dir / name) in line and "refused" in line
    assert not marker.exists()
    assert (exp / "train.yaml").read_bytes() == train_yaml


def test_deepspeeds_own_loads_refuse_code(tmp_path):
    """DeepSpeed's engine reads its model and optimizer files through the checkpoint engine,
    which the trainer replaces: those loads admit no code either."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from u2moe.configs.loading import ConfigError
    from u2moe.trainer.checkpoint_files import CheckpointFiles

    files = CheckpointFiles(TorchCheckpointEngine())
    marker = tmp_path / "ran"
    files.save({"module": Payload(marker)}, str(tmp_path / "mp_rank_00_model_states.pt"))
    assert files.written == {str(tmp_path / "mp_rank_00_model_states.pt"):
                             (tmp_path / "mp_rank_00_model_states.pt").stat().st_size}
    with pytest.raises(ConfigError, match="mp_rank_00_model_states.pt: refused"):
        files.load(str(tmp_path / "mp_rank_00_model_states.pt"), map_location="cpu")
    assert not marker.exists()


def test_start_up_errors_leave_the_exp_dir_as_it_was(corpus, one_rank, tmp_path):
    from u2moe.trainer.export import export_model

    exp = _copy(one_rank[0], tmp_path)
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    cmd = train_command(corpus, exp, nproc=1, extra=[*one_rank[1], "train.max_steps=2"])
    missing = tmp_path / "missing"
    for flag in ("--units", "--cmvn", "--train-shards"):
        bad = list(cmd)
        bad[bad.index(flag) + 1] = str(missing)
        line = _refusal(subprocess.run(bad, capture_output=True, text=True, timeout=300, env=child_env()))
        assert flag in line and str(missing) in line
    # Another model on resume: refused with the differing key named.
    line = _refusal(subprocess.run(cmd + ["--set", "model.encoder.num_blocks=3"], capture_output=True,
                                   text=True, timeout=300, env=child_env()))
    assert "model.encoder.num_blocks: 2 -> 3" in line
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before
    assert export_model(exp, tmp_path / "model.pt") == ["step_00000001"]


def test_a_raw_pickle_given_as_a_model_is_one_line_and_runs_nothing(tmp_path):
    import pickle

    marker = tmp_path / "ran"
    raw, saved = tmp_path / "raw.pt", tmp_path / "saved.pt"
    raw.write_bytes(pickle.dumps({"format": "u2moe-model-v1", "state": Payload(marker)}))
    torch.save({"format": "u2moe-model-v1", "state": Payload(marker)}, saved)
    (tmp_path / "wav.scp").write_text("")
    (tmp_path / "text").write_text("")
    for model in (raw, saved):
        for args in (["decode", "--model", str(model), "--data-dir", str(tmp_path), "--out", str(tmp_path / "dec")],
                     ["export-runtime", "--model", str(model), "--out", str(tmp_path / "rt")]):
            proc = subprocess.run([sys.executable, "-m", "u2moe", *args], capture_output=True, text=True,
                                  env=child_env())
            assert str(model) in _refusal(proc)
    assert not marker.exists()


@pytest.mark.parametrize("args", [["--max-steps", "-5"], ["--max-steps", "0"], ["--max-minutes", "-1"],
                                  ["--max-gpu-memory-gb", "0"]])
def test_limits_that_end_a_run_before_it_starts_are_refused(tmp_path, args):
    placeholders = [arg for flag in ("--config", "--ds-config", "--train-shards", "--dev-shards", "--units",
                                     "--cmvn", "--exp-dir") for arg in (flag, str(tmp_path / "x"))]
    proc = subprocess.run([sys.executable, "-m", "u2moe", "train", *placeholders, *args],
                          capture_output=True, text=True, env=child_env())
    assert proc.returncode == 2 and f"argument {args[0]}: must be > 0" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_expert_parallelism_that_does_not_divide_the_experts_is_refused(corpus, tmp_path):
    cmd = train_command(corpus, tmp_path / "exp", nproc=1, extra=["train.expert_parallel_size=2",
                                                                  "model.encoder.ffn.num_experts=3"])
    line = _refusal(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env()))
    assert "train.expert_parallel_size=2 does not divide model.encoder.ffn.num_experts=3" in line
    assert not (tmp_path / "exp").exists()

"""What one `u2moe train` run leaves in its run directory, and exporting the best of it.

One single-process run of a tiny model, 3 steps with a checkpoint and a dev evaluation at each,
started without model.vocab_size: the units directory gives it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from spawn_helpers import free_port
from trainer_helpers import prepare_corpus, run, train_command
from u2moe.trainer.checkpoint import list_tags, read_fp32_weights
from u2moe.trainer.val_best import best_tags

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dir")
    data = prepare_corpus(root / "data", train_utts=24, dev_utts=4)
    exp = root / "exp"
    cmd = train_command(data, exp, nproc=1, ds_config="zero2_fp32",
                        extra=["train.save_interval=1", "train.eval_interval=1", "train.num_workers=0"])
    vocab = cmd.index(f"model.vocab_size={data['vocab']}")
    del cmd[vocab - 1:vocab + 1]  # the units directory sets it
    log = root / "stdout.log"
    # A port of its own: a single process otherwise takes torch's default, which may be in use.
    run(["env", f"MASTER_PORT={free_port()}", *cmd, "--max-steps", "3"], timeout=600, log=log)
    return {"exp": exp, "data": data, "stdout": log.read_text()}


def test_vocab_size_comes_from_the_units_dir(trained):
    config = yaml.safe_load((trained["exp"] / "train.yaml").read_text())
    assert config["model"]["vocab_size"] == trained["data"]["vocab"]


def test_run_dir_has_the_trainers_log(trained):
    printed = [line for line in trained["stdout"].splitlines() if "[rank 0]" in line]
    assert any("epoch 0 step 3" in line for line in printed) and any("dev step 3" in line for line in printed)
    assert (trained["exp"] / "train.log").read_text().splitlines() == printed


def test_no_deepspeed_script_beside_the_checkpoints(trained):
    root = trained["exp"] / "checkpoints"
    assert list_tags(root) and not list(root.glob("*.py"))


def test_export_val_best_averages_the_checkpoints_of_lowest_dev_loss(trained, tmp_path):
    exp = trained["exp"]
    tags = list_tags(exp / "checkpoints")
    assert tags == ["step_00000001", "step_00000002", "step_00000003"]
    # The dev losses the trainer recorded, one evaluation per step.
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["split"] == "dev"}
    assert sorted(losses) == [1, 2, 3] and len(set(losses.values())) == 3
    best = sorted(sorted(tags, key=lambda t: losses[int(t[5:])])[:2])
    out = tmp_path / "best.pt"
    proc = subprocess.run([sys.executable, "-m", "u2moe", "export", "--exp-dir", str(exp), "--out", str(out),
                           "--average", "2", "--val-best"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"from {', '.join(best)}" in proc.stdout
    weights = torch.load(out, map_location="cpu", weights_only=False)["state_dict"]
    parts = [read_fp32_weights(exp / "checkpoints" / t) for t in best]
    for name, value in weights.items():
        torch.testing.assert_close(value, (parts[0][name].double() + parts[1][name].double()).div(2).float())


def test_best_tags_on_known_losses(tmp_path):
    tags = [f"step_{s:08d}" for s in (100, 200, 300, 400, 500)]
    # 500 has no evaluation at its step, 300 diverged; 200 and 400 tie: the newer wins.
    losses = {100: 3.0, 200: 2.0, 300: float("nan"), 400: 2.0, 450: 0.1}
    assert best_tags(tags, losses, 1, tmp_path) == ["step_00000400"]
    assert best_tags(tags, losses, 2, tmp_path) == ["step_00000200", "step_00000400"]
    assert best_tags(tags, losses, 3, tmp_path) == ["step_00000100", "step_00000200", "step_00000400"]
    from u2moe.configs.loading import ConfigError

    with pytest.raises(ConfigError, match="only 3 of the 5 checkpoints"):
        best_tags(tags, losses, 4, tmp_path)

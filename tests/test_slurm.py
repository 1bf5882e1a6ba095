"""launch/slurm_train.sbatch against a real Slurm: Debian's slurmctld and slurmd on this machine.

A job of two CPU tasks trains tiny_moe with expert parallelism 2, started either by srun (one
task per rank) or by the deepspeed launcher (one task per node, --no_ssh).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_helpers import TINY, prepare_corpus

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
                       reason="needs root and Debian's slurmctld/slurmd (.ci/run installs them)"),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    script = REPO / "tests" / "slurm" / "start_cluster.sh"
    conf = subprocess.run(["bash", str(script), str(state)], capture_output=True, text=True, timeout=120)
    assert conf.returncode == 0, conf.stderr
    yield {**os.environ, "SLURM_CONF": conf.stdout.strip().splitlines()[-1]}
    subprocess.run(["bash", str(script), "--stop", str(state)], timeout=60)


@pytest.mark.parametrize("mode,script", [("srun", True), ("deepspeed", True), ("deepspeed", False)])
def test_sbatch_trains_tiny_moe_with_expert_parallelism_2(slurm, tmp_path, mode, script):
    """script=False: $PYTHON's folder has no `deepspeed` script (installs without scripts), so
    the job runs the launcher's module."""
    data = prepare_corpus(tmp_path / "data", train_utts=24, dev_utts=4)
    exp = tmp_path / "exp"
    args = ["--config", "tiny_moe", "--ds-config", str(REPO / "ds_configs" / "zero2_fp32.json"),
            "--train-shards", str(data["train"]), "--dev-shards", str(data["dev"]),
            "--units", str(data["units"]), "--cmvn", str(data["cmvn"]), "--exp-dir", str(exp),
            "--max-steps", "3"]
    for item in [*TINY, f"model.vocab_size={data['vocab']}", "train.expert_parallel_size=2"]:
        args += ["--set", item]
    python = sys.executable
    if not script:
        wrapper = tmp_path / "bin" / "python3"
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
        python = str(wrapper)
    env = {**slurm, "PYTHON": python, "LAUNCH_MODE": mode, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                          f"--output={out}", str(REPO / "launch" / "slurm_train.sbatch"), *args],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = out.read_text() if out.exists() else ""
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{log[-4000:]}"
    assert f"u2moe: {mode} launch, 1 node(s) x 2 process(es)" in log
    tag = exp / "checkpoints" / "step_00000003"
    # Both expert-parallel ranks wrote their half of the experts.
    assert (tag / "fp32_ep0.pt").is_file() and (tag / "fp32_ep1.pt").is_file()
    assert "epoch 0 step 3" in log

"""launch/slurm_train.sbatch against a real Slurm: Debian's slurmctld and slurmd on this machine.

A job of two CPU tasks trains tiny_moe with expert parallelism 2, started either by srun (one
task per rank) or by the deepspeed launcher (one task per node, --no_ssh). The node has 8 fake
GPUs (tests/slurm/start_cluster.sh): a job that asks for them, as the script does by default,
gets Slurm's GPU variables but no CUDA device, which the trainer must refuse.
"""
from __future__ import annotations

import os
import re
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


@pytest.mark.parametrize("mode,script", [("srun", True), ("deepspeed", False)])
def test_sbatch_trains_tiny_moe_with_expert_parallelism_2(slurm, tmp_path, mode, script):
    """script=False: $PYTHON's folder has no `deepspeed` script (installs without scripts); the
    deepspeed mode runs the launcher's module, so it needs none, and with one beside it nothing
    differs."""
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
                          "--gpus-per-node=0", f"--output={out}", str(REPO / "launch" / "slurm_train.sbatch"), *args],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = out.read_text() if out.exists() else ""
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{log[-4000:]}"
    assert f"u2moe: {mode} launch, 1 node(s) x 2 process(es)" in log
    # srun gets the CPUs of each process (of the node's two, for the deepspeed launcher's task).
    srun_line = next(line for line in log.splitlines() if line.startswith("+ srun "))
    assert f"--cpus-per-task={1 if mode == 'srun' else 2}" in srun_line, srun_line
    tag = exp / "checkpoints" / "step_00000003"
    # Both expert-parallel ranks wrote their half of the experts.
    assert (tag / "fp32_ep0.pt").is_file() and (tag / "fp32_ep1.pt").is_file()
    assert "epoch 0 step 3" in log


def _sbatch(slurm: dict, tmp_path: Path, options: list[str], command: list[str]) -> tuple[int, str]:
    out = tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--wait", f"--output={out}", *options, *command],
                         env={**slurm, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    return job.returncode, job.stdout + job.stderr + (out.read_text() if out.exists() else "")


def test_sbatch_asks_for_gpus_and_refuses_to_train_without_them(slurm, tmp_path):
    """The script's own request (8 GPUs per node) on a node whose GPUs are not CUDA devices: the
    tasks see Slurm's CUDA_VISIBLE_DEVICES but no device, and the job fails instead of training
    on the CPU."""
    from u2moe.data_prep.units import train_units

    (tmp_path / "text").write_text("u1 abc\n")
    train_units(tmp_path / "text", tmp_path / "units", "char")
    present = tmp_path / "present"  # input paths are checked first: the others only need to exist
    present.touch()
    code, log = _sbatch(slurm, tmp_path, ["--ntasks-per-node=2", "--cpus-per-task=1"], [
        str(REPO / "launch" / "slurm_train.sbatch"), "--config", "tiny_moe", "--ds-config",
        str(REPO / "ds_configs" / "zero2_fp32.json"), "--train-shards", str(present), "--dev-shards",
        str(present), "--units", str(tmp_path / "units"), "--cmvn", str(present), "--exp-dir", str(tmp_path / "exp")])
    assert code != 0, log
    assert "GPUs per node: 8" in log, log
    refusals = [line for line in log.splitlines() if "refusing to train on the CPU" in line]
    assert len(refusals) == 2, log  # one per task
    assert all("GPUs were asked for, but this process sees no CUDA device "
               "(CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7)" in line for line in refusals), refusals


@pytest.mark.parametrize("bind,devices", [(False, ["0", "1"]), (True, ["0", "0"])])
def test_each_task_picks_the_device_it_sees(slurm, tmp_path, bind, devices):
    """Two tasks of a 2-GPU job: unbound, each sees both GPUs and its local rank picks; bound one
    GPU per task (srun --gpus-per-task=1), each sees its own, as device 0."""
    pick = ("import os; from u2moe.trainer.device_pick import cuda_index; "
            "visible = os.environ['CUDA_VISIBLE_DEVICES'].split(','); "
            "print('task', os.environ['SLURM_LOCALID'], 'sees', ','.join(visible), 'picks', "
            "cuda_index(int(os.environ['SLURM_LOCALID']), len(visible)))")
    srun = f"srun {'--gpus-per-task=1 ' if bind else ''}{sys.executable} -c \"{pick}\""
    code, log = _sbatch(slurm, tmp_path, ["--ntasks=2", "--cpus-per-task=1", "--gpus-per-node=2"],
                        ["--wrap", srun])
    assert code == 0, log
    picks = dict(re.findall(r"task (\d) sees \S+ picks (\d)", log))
    assert [picks["0"], picks["1"]] == devices, log

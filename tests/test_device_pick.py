"""trainer/device_pick.py: the device a training process takes from what it sees."""
from __future__ import annotations

import pytest
import torch

from u2moe.configs.loading import ConfigError
from u2moe.trainer import device_pick
from u2moe.trainer.device_pick import cuda_index, gpu_request, pick_device


def test_one_visible_gpu_is_device_0_whatever_the_local_rank():
    # Slurm binding one GPU per task: task 3 sees its GPU (CUDA_VISIBLE_DEVICES=3) as device 0.
    assert [cuda_index(rank, 1) for rank in range(4)] == [0, 0, 0, 0]


def test_every_gpu_visible_the_local_rank_picks():
    assert [cuda_index(rank, 4) for rank in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="local rank 4 sees only 4 CUDA devices"):
        cuda_index(4, 4)


@pytest.mark.parametrize("env,asked", [
    ({}, None),
    ({"SLURM_GPUS_PER_NODE": "0", "SLURM_JOB_ID": "7"}, None),
    ({"SLURM_GPUS_PER_NODE": "gpu:0"}, None),
    ({"SLURM_GPUS_PER_NODE": "8"}, "SLURM_GPUS_PER_NODE=8"),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, "SLURM_GPUS_PER_NODE=a100:2"),
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_GPUS": "0,1"}, "SLURM_GPUS_ON_NODE=2"),
    ({"SLURM_STEP_GPUS": "1"}, "SLURM_STEP_GPUS=1"),
])
def test_gpu_request(env, asked):
    assert gpu_request(env) == asked


def test_no_cuda_device_cpu_unless_gpus_were_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(1, {}) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"SLURM_GPUS_PER_NODE=8: GPUs were asked for, but this process sees "
                                          r"no CUDA device \(CUDA_VISIBLE_DEVICES=0,1\)"):
        pick_device(1, {"SLURM_GPUS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"})


def test_cuda_device_from_what_is_visible(monkeypatch):
    monkeypatch.setattr(device_pick.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_pick.torch.cuda, "device_count", lambda: 1)
    assert pick_device(5, {"SLURM_GPUS_PER_TASK": "1"}) == torch.device("cuda", 0)
    monkeypatch.setattr(device_pick.torch.cuda, "device_count", lambda: 8)
    assert pick_device(5, {}) == torch.device("cuda", 5)

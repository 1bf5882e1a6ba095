"""Which device a training process computes on, from what the process itself can see.

A scheduler may show a process every GPU of its node (the deepspeed launcher, torchrun, srun
without binding): its local rank picks one. Or it may bind one GPU per task (srun
--gpus-per-task=1, --gpu-bind, cgroups): the process sees that one only, as CUDA device 0,
whatever its local rank. And a job that asked for GPUs but sees none (a driver or container
problem) must stop, not train on the CPU for days.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..configs.loading import ConfigError

# Slurm's variables that say GPUs were allocated to, or asked for by, the job or the task.
_SLURM_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_PER_TASK",
                        "SLURM_GPUS_PER_NODE", "SLURM_GPUS")


def gpu_request(env: Mapping[str, str]) -> str | None:
    """`NAME=VALUE` of the first Slurm variable that asks for a GPU, None if none does."""
    for name in _SLURM_GPU_VARIABLES:
        value = env.get(name, "").strip()
        # Counts come as "8", "gpu:8" or "a100:8"; "0" (e.g. --gpus-per-node=0) asks for none.
        if value and value.rsplit(":", 1)[-1] not in ("0", "(null)"):
            return f"{name}={value}"
    return None


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of the process with `local_rank` among the `visible` ones it sees."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise ConfigError(f"local rank {local_rank} sees only {visible} CUDA devices: start at most one "
                          "process per GPU")
    return local_rank


def pick_device(local_rank: int, env: Mapping[str, str] = os.environ) -> torch.device:
    """The CUDA device this process sees for its local rank; the CPU only where no GPU was asked for."""
    if torch.cuda.is_available():
        return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
    request = gpu_request(env)
    if request is not None:
        raise ConfigError(f"{request}: GPUs were asked for, but this process sees no CUDA device "
                          f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                          "refusing to train on the CPU")
    return torch.device("cpu")

"""Process-group set-up for every way the trainer is started.

The `deepspeed` launcher and `torchrun` export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT; `srun` (one task per GPU) exports SLURM_* instead, which are translated here; a plain
`python -m u2moe train` is a world of one.
"""
from __future__ import annotations

import logging
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch

from .device_pick import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_env() -> None:
    """Fill the torch.distributed variables from SLURM's when srun started one task per process."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                               text=True).stdout.split()
        os.environ["MASTER_ADDR"] = first[0] if first else "localhost"
    # A port derived from the job id: two jobs sharing a node do not collide.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(timeout: timedelta | None = None) -> DistInfo:
    """The process group, whose collectives give up after `timeout` (None: DeepSpeed's default)."""
    import deepspeed

    _slurm_env()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra = {"timeout": timeout} if timeout is not None else {}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **extra)
    if backend == "gloo" and int(os.environ["WORLD_SIZE"]) > 1:
        _unlink_shm_buffer(int(os.environ["RANK"]))
    # DeepSpeed logs every engine detail at INFO on every rank; our progress lines say what matters.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return DistInfo(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device)


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (ranks of one machine started by its launcher) gives each rank
    a /dev/shm buffer that it never unlinks: every such run would leave them in memory for good,
    piling up run after run. DeepSpeed's initialisation has each rank map every
    buffer, which the barrier waits for; the names can go then. The memory stays mapped until
    the processes end, and is freed when they do, however they end."""
    import torch.distributed as dist

    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{rank}")
    if os.path.exists(name):  # only when DeepSpeed's shm all-reduce is in use
        os.unlink(name)


@contextmanager
def distributed(timeout: timedelta | None = None) -> Iterator[DistInfo]:
    """`init_distributed()` for the length of a job, its process groups destroyed when the job
    ends normally: left to interpreter exit, gloo's threads abort the process ("terminate called
    without an active exception", SIGABRT) after the work is done, failing a finished run. After
    an error they are left alone: the error is the exit status, and a rank whose peers died could
    block in the teardown."""
    import torch.distributed as dist

    info = init_distributed(timeout)
    yield info
    if dist.is_initialized():
        dist.destroy_process_group()


def cap_gpu_memory(device: torch.device, gigabytes: float | None) -> None:
    """Let this process allocate at most `gigabytes` GiB on its GPU, as if the card were that
    small (e.g. 24 on an 80 GB card, to check a recipe for consumer cards). Allocations past the
    cap raise out-of-memory; the caching allocator's peak stays below it. No-op on CPU."""
    if gigabytes is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = gigabytes * 2**30 / total
    if fraction > 1:
        logging.getLogger("u2moe.train").warning("--max-gpu-memory-gb %g exceeds the card's %.1f GiB; no cap",
                                                 gigabytes, total / 2**30)
        return
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def limit_host_threads(device: torch.device, threads: int) -> None:
    """On a GPU, run this process's CPU tensor work on `threads` threads (0: leave torch's
    default); on the CPU, where the model's math runs, change nothing."""
    if device.type != "cpu" and threads > 0:
        torch.set_num_threads(threads)

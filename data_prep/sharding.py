"""Which shards a given data-loader worker reads in a given epoch.

The full list is shuffled with (seed, epoch) -- identically on every rank, since all ranks know
the same seed -- and then dealt round-robin over the ranks, and each rank's share over its
workers. Every shard is therefore read exactly once per epoch across the whole job, no reader needs
to talk to any other, and every rank gets a shard as long as there are as many shards as ranks
(ranks train in lock-step: a rank without data would end every epoch at once). With fewer shards
than readers some workers get nothing; make shards small enough.
"""
from __future__ import annotations

import random
from pathlib import Path


def read_shard_list(path_or_list: str | Path | list[str]) -> list[str]:
    """Shard paths or URLs from a list file (one per line; relative paths are taken relative to the
    list file) or from a Python list as it is."""
    if isinstance(path_or_list, list):
        return list(path_or_list)
    path = Path(path_or_list)
    shards = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Local relative paths follow the list file; URLs (pipe:, http:, ...) stay as they are.
        is_url = ":" in line.split("/", 1)[0]
        shards.append(line if is_url or Path(line).is_absolute() else str(path.parent / line))
    return shards


def shards_for_reader(shards: list[str], *, seed: int, epoch: int, shuffle: bool,
                      rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This reader's share of the epoch's shards."""
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad reader rank={rank}/{world_size} worker={worker}/{num_workers}")
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world_size][worker::num_workers]

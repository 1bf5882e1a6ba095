"""Which shards (or parts of shards) a given data-loader worker reads in a given epoch.

The full list is shuffled with (seed, epoch) -- identically on every rank, since all ranks know
the same seed -- and dealt round-robin over the ranks as far as it deals evenly; the shards left
over (fewer than the ranks) are shared by every rank, utterance by utterance. Each rank's share is
then dealt over its workers. Every utterance is therefore read exactly once per epoch across the
whole job, no reader needs to talk to any other, and ranks read equally many shards: ranks train
in lock-step and an epoch ends when the first runs out, so the data a rank holds beyond the
others' is left out of that epoch (the trainer logs how much). With fewer shards than readers
some workers get nothing; make shards small enough.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShardPart:
    """A shard's utterances number part, part + parts, part + 2 * parts, ...: the whole shard
    when parts is 1."""

    url: str
    part: int = 0
    parts: int = 1


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
                      rank: int, world_size: int, worker: int, num_workers: int) -> list[ShardPart]:
    """This reader's share of the epoch's shards."""
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"bad reader rank={rank}/{world_size} worker={worker}/{num_workers}")
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    dealt = len(order) - len(order) % world_size
    mine = [ShardPart(url) for url in order[rank:dealt:world_size]]
    mine += [ShardPart(url, rank, world_size) for url in order[dealt:]]
    return mine[worker::num_workers]

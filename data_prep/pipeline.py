"""The training/evaluation input pipeline: shards -> padded batches, as a torch DataLoader.

Per reader (one data-loader worker of one rank): its share of the epoch's shards (sharding.py)
-> tar member groups (shard_reader.py) -> samples (sample_processor.py) -> shuffle buffer
(training) -> sort buffer -> static or dynamic batches, or bucket batches (fixed shapes, no sort
buffer) -> padded batch dicts (batching.py).

Skip accounting across processes: each worker keeps a DataStats and attaches what it counted
since its previous batch to the next batch under STATS_KEY; when its shards are exhausted it
sends one last stats-only item. AsrDataLoader, in the trainer's process, pops these, merges them
into `epoch_stats` and logs the epoch's summary, so the trainer sees exactly the documented batch
dict and can all-reduce `loader.epoch_stats.to_dict()` across ranks. No side files, no extra
processes, and counts cannot be lost because they travel with the data they describe.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..configs.data import DataConfig
from .batching import bucket_batches, collate, dynamic_batches, shuffle_buffer, sort_buffer, static_batches
from .errors import DataPrepError
from .features import samples_for_frames
from .sample_processor import SampleProcessor
from .shard_reader import read_shard_part
from .sharding import read_shard_list, shards_for_reader
from .stats import DataStats
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

STATS_KEY = "data_stats"


class AsrDataset(IterableDataset):
    """Iterates over batch dicts (with worker stats attached; AsrDataLoader strips them)."""

    def __init__(self, shards: list[str], tokenizer: Tokenizer, cfg: DataConfig, *, train: bool,
                 seed: int, rank: int, world_size: int):
        super().__init__()
        self.shards, self.tokenizer, self.cfg, self.train = shards, tokenizer, cfg, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order and random streams; call before iterating."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = shards_for_reader(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.train,
                                 rank=self.rank, world_size=self.world_size,
                                 worker=worker, num_workers=num_workers)
        # One independent, reproducible random stream per (epoch, reader).
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        stats = DataStats()
        process = SampleProcessor(self.cfg, self.tokenizer, self.train, stats, rng, generator)
        samples = (s for piece in mine for raw in read_shard_part(piece, stats) if (s := process(raw)) is not None)
        bcfg = self.cfg.batch
        if self.train and bcfg.shuffle_buffer > 1:
            samples = shuffle_buffer(samples, bcfg.shuffle_buffer, rng)
        for batch in self._batches(samples):
            stats.batches += 1
            stats.utterances += len(batch["keys"])
            stats.audio_seconds += sum(batch["durations"])
            batch[STATS_KEY] = stats.take()
            yield batch
        yield {STATS_KEY: stats.take()}

    def _batches(self, samples: Iterator[Any]) -> Iterator[dict[str, Any]]:
        bcfg = self.cfg.batch
        if bcfg.type == "bucket":
            for group, frames in bucket_batches(samples, bcfg.max_frames_in_batch, bcfg.bucket_frames):
                yield collate(group, pad_frames=frames,
                              pad_samples=samples_for_frames(frames, self.cfg.fbank, self.cfg.sample_rate),
                              tokens_multiple=bcfg.bucket_tokens)
            return
        if bcfg.sort_buffer > 1:
            samples = sort_buffer(samples, bcfg.sort_buffer)
        groups = (dynamic_batches(samples, bcfg.max_frames_in_batch) if bcfg.type == "dynamic"
                  else static_batches(samples, bcfg.batch_size))
        for group in groups:
            yield collate(group)


class AsrDataLoader(DataLoader):
    """A plain DataLoader over AsrDataset that gathers the workers' DataStats per epoch.

    After (or during) an epoch `epoch_stats` holds this rank's totals; the summary is logged when
    the epoch's iteration ends. Workers are not persistent, so `set_epoch` reaches them;
    `prefetch` starts the next epoch's workers early, so that the wait for an epoch's first
    batch (shards opened, shuffle and sort buffers filled) overlaps the epoch before it.
    """

    dataset: AsrDataset

    def __init__(self, dataset: AsrDataset, **kwargs: Any):
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.epoch_stats = DataStats()
        self._prefetched: tuple[int, Iterator[dict[str, Any]]] | None = None

    def prefetch(self, epoch: int) -> None:
        """Start epoch `epoch`'s workers now; the next iteration over that epoch uses them.
        Call it once the current epoch's iteration has started (it moves `set_epoch` on)."""
        if self.num_workers == 0:
            return  # one process reads lazily anyway: nothing to overlap
        self.set_epoch(epoch)
        self._prefetched = (epoch, super().__iter__())

    def drop_prefetch(self) -> None:
        """Shut the prefetched epoch's workers down, for a reader that stops before reaching it."""
        self._prefetched = None

    def epoch_batches(self, epoch: int, prefetch_next: bool = True) -> Iterator[dict[str, Any]]:
        """Epoch `epoch`'s batches, with the next epoch's workers started once this one's
        iteration has (`prefetch`), as training reads them."""
        self.set_epoch(epoch)
        batches = iter(self)
        if prefetch_next:
            self.prefetch(epoch + 1)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        # The pipeline draws from its own per-reader streams (dither included); the workers'
        # global torch RNG, seeded from this generator at each iteration, is made a function of
        # (seed, epoch, rank) too, so nothing a worker might draw from it breaks an exact resume.
        ds = self.dataset
        self.generator.manual_seed((ds.seed * 1000003 + ds.rank) * 100003 + epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Not a generator itself: the epoch's source is fixed here, before the caller can move on
        # to prefetching the next one.
        epoch = self.dataset.epoch
        prefetched, self._prefetched = self._prefetched, None
        source = prefetched[1] if prefetched is not None and prefetched[0] == epoch else super().__iter__()
        return self._count(source, epoch)

    def _count(self, source: Iterator[dict[str, Any]], epoch: int) -> Iterator[dict[str, Any]]:
        self.epoch_stats = DataStats()
        for item in source:
            self.epoch_stats.merge(item.pop(STATS_KEY))
            if item:
                yield item
        stats = self.epoch_stats
        title = f"data epoch {epoch} rank {self.dataset.rank}"
        logger.log(logging.WARNING if stats.skipped else logging.INFO, stats.summary(title))


def build_dataloader(shards: str | Path | list[str], tokenizer: Tokenizer, cfg: DataConfig, *,
                     train: bool, seed: int = 0, epoch: int = 0, rank: int | None = None,
                     world_size: int | None = None, num_workers: int = 0, prefetch_factor: int = 2,
                     pin_memory: bool = False) -> AsrDataLoader:
    """A DataLoader yielding batch dicts (see batching.collate) from a shard list file or list.

    rank/world_size default to torch.distributed's when it is initialised, else 0/1. Call
    `loader.set_epoch(e)` before each epoch; in training it reshuffles shards and samples.
    """
    if rank is None or world_size is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
    shard_list = read_shard_list(shards)
    if not shard_list:
        raise DataPrepError(f"{shards}: no shards listed")
    if train and len(shard_list) < world_size:
        # Shards that do not deal evenly are shared by every rank, each reading all of them for its
        # part: with fewer shards than ranks, every rank would read the whole training set.
        raise DataPrepError(f"{shards}: {len(shard_list)} shard(s) for {world_size} ranks; training needs at "
                            "least one shard per rank (write smaller shards: prep shards --utts-per-shard)")
    if len(shard_list) // world_size + len(shard_list) % world_size < max(num_workers, 1):
        logger.warning("%d shards for %d ranks x %d workers: some readers get no data",
                       len(shard_list), world_size, max(num_workers, 1))
    dataset = AsrDataset(shard_list, tokenizer, cfg, train=train, seed=seed, rank=rank, world_size=world_size)
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    loader = AsrDataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                           generator=torch.Generator(), **extra)
    loader.set_epoch(epoch)
    return loader

"""Shuffle buffer, sort buffer, static or dynamic batching, and padding into the batch dict."""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence

from .sample_processor import Sample

IGNORE_ID = -1  # target padding, ignored by the losses (WeNet's IGNORE_ID)


def shuffle_buffer(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Random-replacement buffer: each arrival evicts a random resident once the buffer is full."""
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def sort_buffer(samples: Iterable[Sample], size: int) -> Iterator[Sample]:
    """Sort by length inside consecutive windows of `size`, so batches waste little padding."""
    window: list[Sample] = []
    for sample in samples:
        window.append(sample)
        if len(window) == size:
            yield from sorted(window, key=lambda s: s.num_frames)
            window = []
    yield from sorted(window, key=lambda s: s.num_frames)


T = TypeVar("T")


def static_batches(samples: Iterable[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive groups of `batch_size` items (the last may be smaller)."""
    batch: list[T] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def dynamic_batches(samples: Iterable[Sample], max_frames_in_batch: int) -> Iterator[list[Sample]]:
    """Batches whose padded size, longest * count, stays within max_frames_in_batch.

    The config guarantees no single utterance exceeds the budget (filter.max_frames <= budget).
    """
    batch: list[Sample] = []
    longest = 0
    for sample in samples:
        grown = max(longest, sample.num_frames)
        if batch and grown * (len(batch) + 1) > max_frames_in_batch:
            yield batch
            batch, grown = [], sample.num_frames
        batch.append(sample)
        longest = grown
    if batch:
        yield batch


def collate(samples: list[Sample]) -> dict:
    """The batch dict the trainer and decoder consume, longest utterance first.

    CPU features: keys, feats [B,T,mel] f32, feats_lengths [B] i64, target [B,L] i64 (-1 padded),
    target_lengths [B] i64, durations list[float]. Device features carry wavs [B,S] f32 (0 padded)
    and wav_lengths [B] i64 in place of feats and feats_lengths.
    """
    samples = sorted(samples, key=lambda s: s.num_frames, reverse=True)
    targets = [torch.tensor(s.target, dtype=torch.long) for s in samples]
    batch = {
        "keys": [s.key for s in samples],
        "target": pad_sequence(targets, batch_first=True, padding_value=IGNORE_ID),
        "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long),
        "durations": [s.duration for s in samples],
    }
    if samples[0].wave is not None:
        batch["wavs"] = pad_sequence([s.wave for s in samples], batch_first=True)
        batch["wav_lengths"] = torch.tensor([len(s.wave) for s in samples], dtype=torch.long)
    else:
        batch["feats"] = pad_sequence([s.feats for s in samples], batch_first=True)
        batch["feats_lengths"] = torch.tensor([s.num_frames for s in samples], dtype=torch.long)
    return batch

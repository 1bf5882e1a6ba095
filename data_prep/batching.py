"""Shuffle buffer, sort buffer, static, dynamic or bucket batching, and padding into the batch dict."""
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


def bucket_batches(samples: Iterable[Sample], max_frames_in_batch: int, bucket_frames: int
                   ) -> Iterator[tuple[list[Sample], int]]:
    """(batch, padded frames): each utterance joins the bucket of the multiple of bucket_frames
    at or above its length, and a bucket is yielded (to be padded to that multiple) once it holds
    max_frames_in_batch // multiple utterances (at least one): every batch of a bucket has one
    shape. What the buckets hold when the stream ends goes out longest first, each batch in the
    bucket of its longest utterance, filled with shorter ones: full batches of the same shapes,
    all but the very last (a data-loader worker's stream is short, and partial batches of every
    bucket would be as many new shapes). An open bucket holds less than one batch of frames, so
    memory stays bounded."""

    def bucket(sample: Sample) -> int:
        return -(-sample.num_frames // bucket_frames) * bucket_frames

    def size(padded: int) -> int:
        return max(1, max_frames_in_batch // padded)

    open_buckets: dict[int, list[Sample]] = {}
    for sample in samples:
        padded = bucket(sample)
        batch = open_buckets.setdefault(padded, [])
        batch.append(sample)
        if len(batch) >= size(padded):
            yield open_buckets.pop(padded), padded
    rest = sorted((s for batch in open_buckets.values() for s in batch), key=lambda s: s.num_frames, reverse=True)
    while rest:
        padded = bucket(rest[0])
        yield rest[:size(padded)], padded
        rest = rest[size(padded):]


def _padded_to(x: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    """x [B, T, ...] padded with `value` along T up to `length` (unchanged if already as long)."""
    extra = length - x.size(1)
    if extra <= 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return torch.nn.functional.pad(x, pad, value=value)


def collate(samples: list[Sample], pad_frames: int = 0, pad_samples: int = 0, tokens_multiple: int = 1
            ) -> dict:
    """The batch dict the trainer and decoder consume, longest utterance first.

    CPU features: keys, feats [B,T,mel] f32, feats_lengths [B] i64, target [B,L] i64 (-1 padded),
    target_lengths [B] i64, durations list[float]. Device features carry wavs [B,S] f32 (0 padded)
    and wav_lengths [B] i64 in place of feats and feats_lengths. Bucket batches ask for more
    padding: T at least pad_frames, S at least pad_samples, L a multiple of tokens_multiple.
    """
    samples = sorted(samples, key=lambda s: s.num_frames, reverse=True)
    targets = [torch.tensor(s.target, dtype=torch.long) for s in samples]
    target = pad_sequence(targets, batch_first=True, padding_value=IGNORE_ID)
    batch = {
        "keys": [s.key for s in samples],
        "target": _padded_to(target, -(-target.size(1) // tokens_multiple) * tokens_multiple, IGNORE_ID),
        "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long),
        "durations": [s.duration for s in samples],
    }
    if samples[0].wave is not None:
        batch["wavs"] = _padded_to(pad_sequence([s.wave for s in samples], batch_first=True), pad_samples)
        batch["wav_lengths"] = torch.tensor([len(s.wave) for s in samples], dtype=torch.long)
    else:
        batch["feats"] = _padded_to(pad_sequence([s.feats for s in samples], batch_first=True), pad_frames)
        batch["feats_lengths"] = torch.tensor([s.num_frames for s in samples], dtype=torch.long)
    return batch

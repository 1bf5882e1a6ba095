"""SpecAugment frequency and time masks, WeNet-style, on a padded batch.

One implementation serves both feature paths: the CPU workers call it with a batch of one
utterance, the device-side FeatureExtractor with the whole batch. As in WeNet, each mask starts
uniformly inside the utterance (time) or the mel axis (frequency), is 1..max_width wide, and is
clipped at the end; masks of one utterance never reach into its padding.
"""
from __future__ import annotations

import torch

from ..configs.data import SpecAugConfig


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, cfg: SpecAugConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked copy of feats [B, T, F]; lengths [B] are the valid frames of each utterance."""
    batch, frames, bins = feats.shape
    if batch == 1 and feats.device.type == "cpu":
        return _spec_augment_one(feats, int(lengths[0]), cfg, generator)
    # Only the draws (a few numbers per utterance) come from the CPU generator, in one copy to the
    # features' device; the masks are built there. [B, T] masks built on the host would cost the
    # training process a read-back of the lengths and, on batches past torch's parallel grain,
    # OpenMP regions whose idle threads then spin (bench/omp_spin.py).
    device = feats.device
    draws = [_draw(batch, cfg.num_freq_masks, cfg.max_freq_width, generator),
             _draw(batch, cfg.num_time_masks, cfg.max_time_width, generator)]
    freq_u, freq_w, time_u, time_w = torch.cat([t for d in draws for t in d], 1).to(device, non_blocking=True).split(
        [cfg.num_freq_masks] * 2 + [cfg.num_time_masks] * 2, dim=1)
    freq = _band_mask(bins, torch.full((batch,), bins, device=device), freq_u, freq_w)
    time = _band_mask(frames, lengths.detach().to(device, torch.long).clamp(min=1), time_u, time_w)
    return feats.masked_fill(time[:, :, None] | freq[:, None, :], 0.0)


def _draw(batch: int, count: int, max_width: int, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """Per row, `count` uniform starts in [0, 1) and widths in 1..max_width (as floats: one copy)."""
    uniform = torch.rand(batch, count, generator=generator)
    return uniform, torch.randint(1, max_width + 1, (batch, count), generator=generator).float()


def _band_mask(size: int, limit: torch.Tensor, uniform: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """[B, size] bool: per row, bands starting at uniform * limit, `width` wide, clipped at limit."""
    start = (uniform * limit[:, None]).long()
    end = torch.minimum(start + width.long(), limit[:, None])
    pos = torch.arange(size, device=limit.device)
    return ((pos >= start[..., None]) & (pos < end[..., None])).any(dim=1)


def _spec_augment_one(feats: torch.Tensor, length: int, cfg: SpecAugConfig,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The CPU workers' case, one utterance: the same draws as the batched path, applied as slice
    assignments instead of building and broadcasting masks, which cost more for one utterance."""
    bins = feats.shape[2]
    freq = _bands(bins, cfg.num_freq_masks, cfg.max_freq_width, generator)
    time = _bands(max(length, 1), cfg.num_time_masks, cfg.max_time_width, generator)
    out = feats.clone()
    for start, end in freq:
        out[0, :, start:end] = 0.0
    for start, end in time:
        out[0, start:end] = 0.0
    return out


def _bands(limit: int, count: int, max_width: int, generator: torch.Generator | None) -> list[tuple[int, int]]:
    """`count` (start, end) bands below `limit`, drawn exactly as `_draw` draws one row."""
    uniform, width = _draw(1, count, max_width, generator)
    start = (uniform * limit).long()
    return [(s, min(s + w, limit)) for s, w in zip(start[0].tolist(), width[0].long().tolist())]

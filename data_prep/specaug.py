"""SpecAugment frequency and time masks, WeNet-style, on a padded batch.

One implementation serves both feature paths: the CPU workers call it with a batch of one
utterance, the device-side FeatureExtractor with the whole batch. As in WeNet, each mask starts
uniformly inside the utterance (time) or the mel axis (frequency), is 1..max_width wide, and is
clipped at the end; masks of one utterance never reach into its padding.
"""
from __future__ import annotations

import torch

from .config import SpecAugConfig


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, cfg: SpecAugConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked copy of feats [B, T, F]; lengths [B] are the valid frames of each utterance."""
    batch, frames, bins = feats.shape
    if batch == 1 and feats.device.type == "cpu":
        return _spec_augment_one(feats, int(lengths[0]), cfg, generator)
    # Draw on the CPU (where the generator lives); only the two small [B, axis] masks move.
    lengths_cpu = lengths.detach().to("cpu", torch.long).clamp(min=1)
    freq = _band_mask(batch, bins, torch.full((batch,), bins), cfg.num_freq_masks, cfg.max_freq_width, generator)
    time = _band_mask(batch, frames, lengths_cpu, cfg.num_time_masks, cfg.max_time_width, generator)
    mask = time.to(feats.device)[:, :, None] | freq.to(feats.device)[:, None, :]
    return feats.masked_fill(mask, 0.0)


def _band_mask(batch: int, size: int, limit: torch.Tensor, count: int, max_width: int,
               generator: torch.Generator | None) -> torch.Tensor:
    """[B, size] bool: `count` bands per row, each starting below that row's limit."""
    start = (torch.rand(batch, count, generator=generator) * limit[:, None]).long()
    width = torch.randint(1, max_width + 1, (batch, count), generator=generator)
    end = torch.minimum(start + width, limit[:, None])
    pos = torch.arange(size)
    return ((pos >= start[..., None]) & (pos < end[..., None])).any(dim=1)


def _spec_augment_one(feats: torch.Tensor, length: int, cfg: SpecAugConfig,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The CPU workers' case, one utterance: the same draws as the batched path, applied as slice
    assignments instead of building and broadcasting masks (a few times cheaper per utterance)."""
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
    """`count` (start, end) bands below `limit`, drawn exactly as _band_mask draws one row."""
    start = (torch.rand(1, count, generator=generator) * limit).long()
    width = torch.randint(1, max_width + 1, (1, count), generator=generator)
    return [(s, min(s + w, limit)) for s, w in zip(start[0].tolist(), width[0].tolist())]

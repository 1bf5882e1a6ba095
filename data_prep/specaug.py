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

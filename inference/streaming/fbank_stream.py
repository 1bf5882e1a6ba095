"""Incremental fbank: audio pieces in, the frames their whole windows allow out.

Kaldi fbank frames (snip_edges, no dither) depend only on their own window, so computing them
over a sliding buffer of samples gives exactly the frames of the whole waveform.
"""
from __future__ import annotations

import torch

from ...configs.data import DataConfig
from ...data_prep.features import compute_fbank, num_frames, window_sizes


class FbankStream:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.length, self.shift = window_sizes(cfg.fbank, cfg.sample_rate)
        self.reset()

    def reset(self) -> None:
        self.samples = torch.zeros(0)

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """samples: 1-D float in [-1, 1] at cfg.sample_rate -> new frames [n, num_mel_bins]."""
        self.samples = torch.cat([self.samples, samples.float().reshape(-1)])
        n = num_frames(self.samples.numel(), self.cfg.fbank, self.cfg.sample_rate)
        if n == 0:
            return torch.zeros(0, self.cfg.fbank.num_mel_bins)
        feats = compute_fbank(self.samples[:(n - 1) * self.shift + self.length], self.cfg.fbank,
                              self.cfg.sample_rate, dither=0.0)
        self.samples = self.samples[n * self.shift:]
        return feats

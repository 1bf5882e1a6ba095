"""Batched Kaldi fbank (+ SpecAugment in training) as a module, for features on the GPU.

With `DataConfig.device_features` the data workers only decode and resample; the trainer moves
the padded waveforms to its device and calls this module. The fbank is features.KaldiFbank, the
same code the CPU workers run per utterance (a batched re-implementation of
torchaudio.compliance.kaldi.fbank), so both paths give the same features.
"""
from __future__ import annotations

import torch
from torch import nn

from ..configs.data import DataConfig
from .features import KaldiFbank
from .specaug import spec_augment


class FeatureExtractor(nn.Module):
    """(wavs [B, S] in [-1, 1], wav_lengths [B]) -> (feats [B, T, mel], feats_lengths [B]).

    Training mode applies dither and SpecAugment as the CPU path does in training; eval mode
    applies neither. Padded frames are zero, as in the CPU path's padded batches. `generator`
    (a CPU torch.Generator) draws the SpecAugment masks, and the dither too when the waveforms
    are on the CPU; on another device the dither comes from that device's default RNG.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.fbank = KaldiFbank(cfg.fbank, cfg.sample_rate)  # no parameters, no state-dict entries

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dither = self.cfg.fbank.dither if self.training else 0.0
        feats, lengths = self.fbank(wavs, wav_lengths, dither, generator)
        if self.training and self.cfg.spec_aug.enabled and feats.shape[1] > 0:
            feats = spec_augment(feats, lengths, self.cfg.spec_aug, generator)
        return feats, lengths

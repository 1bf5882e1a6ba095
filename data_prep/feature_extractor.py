"""Batched Kaldi fbank (+ SpecAugment in training) as a module, for features on the GPU.

With `DataConfig.device_features` the data workers only decode and resample; the trainer moves
the padded waveforms to its device and calls this module. The computation is a batched
re-implementation of torchaudio.compliance.kaldi.fbank (which only takes one utterance) with the
same steps in the same order: frames of whole windows (snip_edges), dither, DC removal,
pre-emphasis 0.97, Povey window, zero padding to a power of two, power spectrum, Kaldi mel banks,
log with float32 epsilon floor. Within float tolerance it equals the CPU worker path.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import DataConfig
from .features import WAVE_SCALE, window_sizes
from .specaug import spec_augment

_PREEMPHASIS = 0.97
_POVEY_POWER = 0.85
# kaldi.fbank defaults: low_freq=20, high_freq=0 (Nyquist), no VTLN warping.
_MEL_LOW_HZ, _MEL_HIGH_HZ, _VTLN_LOW, _VTLN_HIGH, _VTLN_WARP = 20.0, 0.0, 100.0, -500.0, 1.0


class FeatureExtractor(nn.Module):
    """(wavs [B, S] in [-1, 1], wav_lengths [B]) -> (feats [B, T, mel], feats_lengths [B]).

    Training mode applies dither and SpecAugment as the CPU path does in training; eval mode
    applies neither. Padded frames are zero, as in the CPU path's padded batches.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        from torchaudio.compliance.kaldi import get_mel_banks

        self.cfg = cfg
        self.win_length, self.win_shift = window_sizes(cfg.fbank, cfg.sample_rate)
        self.fft_size = 1 << (self.win_length - 1).bit_length()
        window = torch.hann_window(self.win_length, periodic=False, dtype=torch.float32).pow(_POVEY_POWER)
        mel, _ = get_mel_banks(cfg.fbank.num_mel_bins, self.fft_size, float(cfg.sample_rate),
                               _MEL_LOW_HZ, _MEL_HIGH_HZ, _VTLN_LOW, _VTLN_HIGH, _VTLN_WARP)
        mel = nn.functional.pad(mel.float(), (0, 1))  # the Nyquist bin gets no weight, as in Kaldi
        # Derived from the config, so not part of the state dict.
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_t", mel.t().contiguous(), persistent=False)

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=wavs.device.type, enabled=False):
            return self._fbank(wavs, wav_lengths, generator)

    def _fbank(self, wavs: torch.Tensor, wav_lengths: torch.Tensor,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.where(wav_lengths >= self.win_length,
                              1 + (wav_lengths - self.win_length) // self.win_shift, 0).long()
        num = int(lengths.max()) if lengths.numel() else 0
        batch = wavs.shape[0]
        if num == 0:
            return wavs.new_zeros(batch, 0, self.cfg.fbank.num_mel_bins), lengths
        x = wavs.float() * WAVE_SCALE
        frames = x.unfold(1, self.win_length, self.win_shift)[:, :num]  # [B, T, win]
        if self.training and self.cfg.fbank.dither > 0:
            frames = frames + torch.randn_like(frames) * self.cfg.fbank.dither
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - _PREEMPHASIS * previous) * self.window
        power = torch.fft.rfft(frames, n=self.fft_size).abs().pow(2.0)
        eps = torch.finfo(torch.float32).eps
        feats = torch.matmul(power, self.mel_t).clamp_min(eps).log()
        valid = torch.arange(num, device=feats.device)[None, :] < lengths[:, None]
        feats = feats.masked_fill(~valid[:, :, None], 0.0)
        if self.training and self.cfg.spec_aug.enabled:
            feats = spec_augment(feats, lengths, self.cfg.spec_aug, generator)
        return feats, lengths

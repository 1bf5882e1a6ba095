"""Kaldi-compatible log mel filterbank: the one implementation, batched, for every feature path.

`KaldiFbank` computes what `torchaudio.compliance.kaldi.fbank` computes with WeNet's settings
(which the tests keep as the independent reference), for a padded batch at once and on any
device: frames of whole windows (snip_edges), dither, DC removal, pre-emphasis 0.97, Povey
window, zero padding to a power of two, power spectrum, Kaldi mel banks, log with float32 epsilon
floor. Users:

* the CPU data workers (SampleProcessor) call `compute_fbank` per utterance, dither drawn from
  the reader's generator;
* `FeatureExtractor` (device features) runs it on the trainer's device over whole batches;
* decoding and streaming call `compute_fbank` without dither.

Unlike kaldi.fbank it builds the window and the mel banks once per (config, sample rate, device)
and skips the work whose result fbank discards (the frame energies), which makes it about twice
as fast per utterance on the CPU.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ..configs.data import FbankConfig

# WeNet (and Kaldi) feed fbank 16-bit sample values, not [-1, 1] floats: dither and the energy
# floor are tuned to that scale, so the features and the CMVN statistics depend on it.
WAVE_SCALE = 32768.0

_PREEMPHASIS = 0.97
_POVEY_POWER = 0.85
# kaldi.fbank defaults: low_freq=20, high_freq=0 (Nyquist), no VTLN warping.
_MEL_LOW_HZ, _MEL_HIGH_HZ, _VTLN_LOW, _VTLN_HIGH, _VTLN_WARP = 20.0, 0.0, 100.0, -500.0, 1.0
_EPS = torch.finfo(torch.float32).eps


def window_sizes(cfg: FbankConfig, sample_rate: int) -> tuple[int, int]:
    """(window length, window shift) in samples, truncated as torchaudio's kaldi.fbank does."""
    return int(sample_rate * cfg.frame_length / 1000), int(sample_rate * cfg.frame_shift / 1000)


def num_frames(num_samples: int, cfg: FbankConfig, sample_rate: int) -> int:
    """Frames fbank yields for this many samples (snip_edges=True: whole windows only)."""
    length, shift = window_sizes(cfg, sample_rate)
    return 0 if num_samples < length else 1 + (num_samples - length) // shift


def samples_for_frames(frames: int, cfg: FbankConfig, sample_rate: int) -> int:
    """The fewest samples that give `frames` (>= 1) fbank frames: num_frames' inverse."""
    length, shift = window_sizes(cfg, sample_rate)
    return length + (frames - 1) * shift


class KaldiFbank(nn.Module):
    """(wavs [B, S] in [-1, 1], lengths [B] | None, dither) -> (feats [B, T, mel], lengths [B]).

    `lengths=None` means every row is whole. Frames past a row's length are zero. Dither noise
    (Gaussian, `dither` on the 16-bit scale, independent per frame sample as in Kaldi) comes from
    `generator` when it lives on the waveforms' device, else from that device's default RNG.
    The energy floor does not enter: kaldi.fbank uses it only for the energy feature
    (use_energy=True), which WeNet does not use. Always computes in float32, even under autocast.
    """

    def __init__(self, cfg: FbankConfig, sample_rate: int):
        super().__init__()
        from torchaudio.compliance.kaldi import get_mel_banks

        self.num_mel_bins = cfg.num_mel_bins
        self.win_length, self.win_shift = window_sizes(cfg, sample_rate)
        self.fft_size = 1 << (self.win_length - 1).bit_length()
        window = torch.hann_window(self.win_length, periodic=False, dtype=torch.float32).pow(_POVEY_POWER)
        mel, _ = get_mel_banks(cfg.num_mel_bins, self.fft_size, float(sample_rate),
                               _MEL_LOW_HZ, _MEL_HIGH_HZ, _VTLN_LOW, _VTLN_HIGH, _VTLN_WARP)
        mel = nn.functional.pad(mel.float(), (0, 1))  # the Nyquist bin gets no weight, as in Kaldi
        # Derived from the config, so not part of any state dict.
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("mel_t", mel.t().contiguous(), persistent=False)

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor | None = None, dither: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_autocast_enabled(wavs.device.type):
            with torch.autocast(device_type=wavs.device.type, enabled=False):
                return self._fbank(wavs, lengths, dither, generator)
        return self._fbank(wavs, lengths, dither, generator)

    def frame_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.where(lengths >= self.win_length, 1 + (lengths - self.win_length) // self.win_shift, 0).long()

    def _fbank(self, wavs: torch.Tensor, lengths: torch.Tensor | None, dither: float,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, samples = wavs.shape
        # Frames of the padded width, not of the longest row: the same for a batch padded to its
        # longest row, the bucket's length for a bucket batch, and no read of the lengths.
        num = 0 if samples < self.win_length else 1 + (samples - self.win_length) // self.win_shift
        if lengths is None:
            frame_lengths = torch.full((batch,), num, dtype=torch.long, device=wavs.device)
        else:
            frame_lengths = self.frame_counts(lengths)
        if num == 0 or batch == 0:
            return wavs.new_zeros(batch, 0, self.num_mel_bins, dtype=torch.float32), frame_lengths
        x = wavs.float() * WAVE_SCALE
        frames = x.unfold(1, self.win_length, self.win_shift)[:, :num]  # [B, T, win], a view
        if dither > 0:
            gen = generator if generator is not None and generator.device == x.device else None
            noise = torch.randn(frames.shape, generator=gen, device=x.device, dtype=x.dtype)
            frames = noise.mul_(dither).add_(frames)
            frames.sub_(frames.mean(dim=-1, keepdim=True))
        else:
            frames = frames - frames.mean(dim=-1, keepdim=True)
        # Pre-emphasis (the first sample against itself) and window, into the zero-padded FFT input.
        padded = frames.new_zeros(batch, num, self.fft_size)
        body = padded[..., :self.win_length]
        torch.mul(frames[..., :-1], _PREEMPHASIS, out=body[..., 1:])
        body[..., 0] = frames[..., 0] * _PREEMPHASIS
        torch.sub(frames, body, out=body)
        body.mul_(self.window)
        spectrum = torch.fft.rfft(padded)
        power = (spectrum * spectrum.conj()).real  # |X|^2, much cheaper than abs().pow(2)
        feats = torch.matmul(power, self.mel_t).clamp_min_(_EPS).log_()
        if lengths is not None:
            valid = torch.arange(num, device=feats.device)[None, :] < frame_lengths[:, None]
            feats.masked_fill_(~valid[:, :, None], 0.0)
        return feats, frame_lengths


@lru_cache(maxsize=8)
def fbank_module(cfg: FbankConfig, sample_rate: int, device: str = "cpu") -> KaldiFbank:
    """The process's KaldiFbank for this config, sample rate and device (built once)."""
    return KaldiFbank(cfg, sample_rate).to(device)


def compute_fbank(wave: torch.Tensor, cfg: FbankConfig, sample_rate: int, dither: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """[T, num_mel_bins] float32 from a 1-D float waveform in [-1, 1] (no frame: [0, mel]).

    Dither noise comes from `generator` (see KaldiFbank), else the global torch RNG.
    """
    feats, _ = fbank_module(cfg, sample_rate, str(wave.device))(wave.reshape(1, -1), None, dither, generator)
    return feats[0]

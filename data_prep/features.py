"""Per-utterance Kaldi-compatible log mel filterbank, as WeNet computes it in its data workers."""
from __future__ import annotations

import torch

from .config import FbankConfig

# WeNet (and Kaldi) feed fbank 16-bit sample values, not [-1, 1] floats: dither and the energy
# floor are tuned to that scale, so the features and the CMVN statistics depend on it.
WAVE_SCALE = 32768.0


def window_sizes(cfg: FbankConfig, sample_rate: int) -> tuple[int, int]:
    """(window length, window shift) in samples, truncated as torchaudio's kaldi.fbank does."""
    return int(sample_rate * cfg.frame_length / 1000), int(sample_rate * cfg.frame_shift / 1000)


def num_frames(num_samples: int, cfg: FbankConfig, sample_rate: int) -> int:
    """Frames fbank yields for this many samples (snip_edges=True: whole windows only)."""
    length, shift = window_sizes(cfg, sample_rate)
    return 0 if num_samples < length else 1 + (num_samples - length) // shift


def compute_fbank(wave: torch.Tensor, cfg: FbankConfig, sample_rate: int, dither: float) -> torch.Tensor:
    """[T, num_mel_bins] float32 from a 1-D float waveform in [-1, 1]; needs >= one window."""
    import torchaudio

    return torchaudio.compliance.kaldi.fbank(
        wave.unsqueeze(0) * WAVE_SCALE,
        num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length,
        frame_shift=cfg.frame_shift,
        dither=dither,
        energy_floor=cfg.energy_floor,
        sample_frequency=sample_rate,
    )

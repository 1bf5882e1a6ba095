"""Audio I/O: read Kaldi rxfilenames, decode bytes, resample, speed-perturb, encode cuts.

Decoding goes through soundfile (libsndfile: wav, flac, ogg/vorbis, ogg/opus, mp3, ...) because
torchaudio 2.11 no longer loads audio itself; torchaudio is used only for signal processing.
"""
from __future__ import annotations

import io
import subprocess
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch

# Tar member extensions that hold audio, in order of preference when a group has several.
AUDIO_EXTENSIONS = ("flac", "wav", "opus", "ogg", "mp3", "sph")


class AudioError(Exception):
    """Audio that cannot be read or decoded; the message says why."""


def read_source(source: str) -> bytes:
    """Bytes of a Kaldi rxfilename: a path, or a shell command ending in '|' whose stdout is audio."""
    if source.endswith("|"):
        proc = subprocess.run(source[:-1], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise AudioError(f"command exited {proc.returncode}: {err[-1] if err else ''}")
        if not proc.stdout:
            raise AudioError("command produced no output")
        return proc.stdout
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as err:
        raise AudioError(str(err)) from err


def probe(data: bytes) -> sf._SoundFileInfo:
    """Header information (format, rate, frames) without decoding the samples."""
    try:
        return sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"not decodable audio ({err})") from err


def extension_for(info: sf._SoundFileInfo) -> str:
    """The tar member extension that names this encoded format."""
    if info.format == "OGG":
        return "opus" if info.subtype == "OPUS" else "ogg"
    ext = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "MPEG": "mp3", "NIST": "sph"}.get(info.format)
    if ext is None:
        raise AudioError(f"unsupported container {info.format}/{info.subtype}")
    return ext


def decode(data: bytes, dtype: str = "float32") -> tuple[np.ndarray, int, int]:
    """Decode encoded audio to (samples [frames, channels], sample_rate, channels)."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype=dtype, always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"not decodable audio ({err})") from err
    if samples.shape[0] == 0:
        raise AudioError("no samples")
    return samples, rate, samples.shape[1]


def encode_flac(samples: np.ndarray, rate: int) -> bytes:
    """Lossless FLAC of int16 samples (16 bit) or int32 samples (stored as 24 bit)."""
    subtype = "PCM_16" if samples.dtype == np.int16 else "PCM_24"
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


def encode_wav(samples: np.ndarray, rate: int) -> bytes:
    """WAV of int16 samples (16 bit) or int32 samples (stored as 24 bit), as encode_flac."""
    subtype = "PCM_16" if samples.dtype == np.int16 else "PCM_24"
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torch.nn.Module:
    # Building the sinc kernel costs more than applying it to one utterance; keep a few.
    import torchaudio

    return torchaudio.transforms.Resample(orig, new)


def resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited resampling of a 1-D float waveform."""
    if orig == new:
        return wave
    return _resampler(orig, new)(wave)


def speed_perturb(wave: torch.Tensor, rate: int, speed: float) -> torch.Tensor:
    """Play `speed` times faster, changing tempo and pitch together like sox `speed` (Kaldi, WeNet).

    Reinterpreting the samples as recorded at rate*speed and resampling back to `rate` is exactly
    what sox's speed effect does.
    """
    if speed == 1.0:
        return wave
    return resample(wave, round(rate * speed), rate)

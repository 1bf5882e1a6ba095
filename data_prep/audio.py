"""Audio I/O: read Kaldi rxfilenames, decode bytes, resample, speed-perturb, encode cuts.

Decoding goes through soundfile (libsndfile: wav, flac, ogg/vorbis, ogg/opus, mp3, ...) because
torchaudio (2.11 on) does not load audio itself; torchaudio is used only for signal processing.
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


# A WAV data chunk size at or above this is a streaming writer's "length unknown" (sox writes
# 0x7ffff000, others 0xffffffff), not a promise of that many bytes.
_WAV_SIZE_UNKNOWN = 0x7FFFF000
_OGG_END_OF_STREAM = 0x04
# libsndfile's frame count for a stream that declares no length (e.g. FLAC written to a pipe):
# nothing to fall short of.
_FRAMES_UNKNOWN = 2**62


class AudioError(Exception):
    """Audio that cannot be read or decoded; the message says why."""

    kind = "audio_undecodable"  # the DataStats kind it is counted under


class AudioTruncated(AudioError):
    """Audio that ends before its container says it does: a cut or partly written file."""

    kind = "audio_truncated"


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
    """Header information (format, rate, frames) without decoding the samples; audio cut short
    as check_complete sees it raises AudioTruncated."""
    check_complete(data)
    try:
        return sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"not decodable audio ({err})") from err


def _wav_shortfall(data: bytes) -> str | None:
    """Why a RIFF/WAVE file holds less audio than its data chunk declares, or None."""
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            present = len(data) - pos - 8
            if 0 < size < _WAV_SIZE_UNKNOWN and present < size:
                return f"WAV data chunk holds {present} of its declared {size} bytes"
            return None
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    return None


def _ogg_shortfall(data: bytes) -> str | None:
    """Why an Ogg stream (Opus, Vorbis) ends early, or None. Ogg declares no length: a complete
    stream ends with a page flagged end-of-stream, a cut one with a plain or partial page."""
    pos, flags = 0, 0
    while data.startswith(b"OggS", pos) and pos + 27 <= len(data):
        segments = data[pos + 26]
        if pos + 27 + segments > len(data):
            break
        end = pos + 27 + segments + sum(data[pos + 27:pos + 27 + segments])
        if end > len(data):
            break
        flags, pos = data[pos + 5], end
    if pos < len(data) and b"OggS".startswith(data[pos:pos + 4]):
        return f"Ogg stream ends inside a page at byte {pos} of {len(data)}"
    if not flags & _OGG_END_OF_STREAM:
        return "Ogg stream ends without its end-of-stream page"
    return None


def check_complete(data: bytes) -> None:
    """Raise AudioTruncated where the container shows that audio is missing from its end: WAV's
    declared data size, Ogg's end-of-stream page. Cheap: nothing is decoded."""
    shortfall = None
    if data.startswith(b"RIFF") and data[8:12] == b"WAVE":
        shortfall = _wav_shortfall(data)
    elif data.startswith(b"OggS"):
        shortfall = _ogg_shortfall(data)
    if shortfall is not None:
        raise AudioTruncated(shortfall)


def extension_for(info: sf._SoundFileInfo) -> str:
    """The tar member extension that names this encoded format."""
    if info.format == "OGG":
        return "opus" if info.subtype == "OPUS" else "ogg"
    ext = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "MPEG": "mp3", "NIST": "sph"}.get(info.format)
    if ext is None:
        raise AudioError(f"unsupported container {info.format}/{info.subtype}")
    return ext


def decode(data: bytes, dtype: str = "float32") -> tuple[np.ndarray, int, int]:
    """Decode encoded audio to (samples [frames, channels], sample_rate, channels).

    Raises AudioTruncated for audio cut short: by its container (check_complete), by a decoder
    error after the header was read, or by fewer samples than the header declares.
    """
    check_complete(data)
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"not decodable audio ({err})") from err
    with f:
        declared = f.frames if f.frames < _FRAMES_UNKNOWN else None
        try:
            samples = f.read(dtype=dtype, always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as err:
            if declared is None:
                raise AudioError(f"not decodable audio ({err})") from err
            raise AudioTruncated(f"decoder error after {f.tell()} of {declared} frames ({err})") from err
        rate = f.samplerate
    if samples.shape[0] == 0:
        raise AudioError("no samples")
    if declared is not None and samples.shape[0] < declared:
        raise AudioTruncated(f"{samples.shape[0]} of the {declared} frames its header declares")
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

"""Audio for transcription: paths (files, folders, `-` for a list on stdin) and waveforms of any
sample rate and channel count, turned into mono float waveforms at the model's rate.

Files are decoded by data_prep.audio (soundfile: wav, flac, ogg, opus, mp3, ...). Unlike
training, which keeps the first channel as Kaldi does, channels are averaged: a recording's
speaker may be on either side.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import numpy as np
import soundfile as sf
import torch

from ..data_prep import audio
from ..data_prep.audio import AudioError

# File name endings a folder is searched for (explicitly named files are read whatever they end in).
AUDIO_SUFFIXES = frozenset(f".{ext}" for ext in (*audio.AUDIO_EXTENSIONS, "oga", "aiff", "aif", "au"))


def expand_paths(items: Iterable[str], stdin: TextIO) -> tuple[list[Path], list[str]]:
    """(audio paths in order, problems): folders are searched recursively (sorted), `-` reads
    one path a line from stdin; a folder without audio is a problem, not an error."""
    paths: list[Path] = []
    problems: list[str] = []
    for item in items:
        names = [line.strip() for line in stdin if line.strip()] if item == "-" else [item]
        for name in names:
            path = Path(name)
            if not path.is_dir():
                paths.append(path)
                continue
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            if not found:
                problems.append(f"{path}: no audio files in this folder")
            paths.extend(found)
    return paths, problems


def duration_of(path: Path) -> float:
    """Seconds of audio from the file's header (nothing decoded); 0 where it declares no length."""
    if not path.is_file():
        raise AudioError("no such file")
    if path.stat().st_size == 0:
        raise AudioError("empty file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as err:
        raise AudioError(f"cannot read audio ({err})") from err
    return info.duration if info.frames < 2**62 else 0.0


def mono_waveform(samples: np.ndarray | torch.Tensor, sample_rate: int, target_rate: int) -> torch.Tensor:
    """1-D float32 at target_rate. samples: [S], or [S, C] / [C, S] (the shorter axis is taken as
    the channels, which are averaged); integer samples are scaled to [-1, 1]."""
    wave = torch.as_tensor(samples)
    if not wave.is_floating_point():
        wave = wave.float() / float(torch.iinfo(wave.dtype).max + 1)
    wave = wave.float()
    if wave.dim() == 2:
        wave = wave.mean(dim=int(wave.size(0) > wave.size(1)))
    if wave.dim() != 1:
        raise ValueError(f"audio must be 1-D or [samples, channels], got shape {tuple(wave.shape)}")
    return audio.resample(wave.contiguous(), sample_rate, target_rate)


def read_waveform(path: Path, target_rate: int) -> torch.Tensor:
    """A file's audio, mono at target_rate; AudioError names what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AudioError(err.strerror or str(err)) from err
    if not data:
        raise AudioError("empty file")
    samples, rate, _ = audio.decode(data)
    return mono_waveform(samples, rate, target_rate)

"""Shared helpers for the data tests (no tests here): corpus lookup, tiny Kaldi dirs, tar files.

The shared corpora live beside the repository (`<repo>/../shared/corpora`), or under
$U2MOE_SHARED/corpora when that is set.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


# A character table for synth-en style transcripts, for tests that need no trained units.
LETTERS = ["<blank>", "<unk>", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'", "\u2581", "<sos/eos>"]


def shared_corpus(name: str) -> Path:
    root = Path(os.environ.get("U2MOE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
    path = root / "corpora" / name
    if not (path / "README.md").is_file():
        pytest.fail(f"corpus {name} not found at {path} (set U2MOE_SHARED to the shared/ directory)")
    return path


def read_kaldi_table(path: Path) -> dict[str, str]:
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(" ")
        table[key] = value.strip()
    return table


def make_kaldi_dir(root: Path, corpus: str = "synth-en", split: str = "dev", count: int = 8,
                   start: int = 0) -> tuple[Path, dict[str, tuple[str, float, Path]]]:
    """A small corpus copy in the synth layout (wav.scp relative to the corpus root).

    Returns the data dir and {key: (transcript, duration, audio path)}.
    """
    source = shared_corpus(corpus)
    texts = read_kaldi_table(source / split / "text")
    durs = read_kaldi_table(source / split / "utt2dur")
    spks = read_kaldi_table(source / split / "utt2spk")
    wavs = read_kaldi_table(source / split / "wav.scp")
    keys = sorted(wavs)[start:start + count]
    data_dir = root / split
    (root / "audio" / split).mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    utts = {}
    for key in keys:
        shutil.copy(source / wavs[key], root / wavs[key])
        utts[key] = (texts[key], float(durs[key]), root / wavs[key])
    for name, table in (("wav.scp", wavs), ("text", texts), ("utt2spk", spks)):
        (data_dir / name).write_text("".join(f"{k} {table[k]}\n" for k in keys), encoding="utf-8")
    return data_dir, utts


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """int16 sine plus a little noise (so no frame is digital silence)."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (np.clip(0.3 * np.sin(2 * np.pi * freq * t) + noise, -1, 1) * 32767).astype(np.int16)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def run_prep(argv: list[str]) -> int:
    """Dispatch `u2moe prep ...` through the data CLI registrar as u2moe.__main__.main does."""
    from u2moe.data_prep.cli import register

    parser = argparse.ArgumentParser(prog="u2moe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)

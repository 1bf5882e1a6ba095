"""Tiny models, unit tables and audio shared by the decoding, streaming and export tests."""
from __future__ import annotations

import math

import torch

from u2moe.configs.experiment import load_config
from u2moe.model import U2Model


def tiny_model(preset: str, seed: int = 0, *overrides: str) -> U2Model:
    torch.manual_seed(seed)
    return U2Model(load_config(preset, list(overrides)).model).eval()


def units_for(vocab_size: int) -> list[str]:
    """A valid unit table: <blank>, <unk>, letters, word boundary, filler units, <sos/eos>."""
    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["\u2581"]
    fillers = [f"u{i}" for i in range(vocab_size - 3 - len(letters))]
    return ["<blank>", "<unk>"] + letters + fillers + ["<sos/eos>"]


def chirp(seconds: float, seed: int, rate: int = 16000) -> torch.Tensor:
    """Speech-like test audio: a gliding tone with noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    tone = 0.3 * torch.sin(2 * math.pi * (200 + 300 * t) * t)
    return tone + 0.05 * torch.randn(t.numel(), generator=g)

"""Global cepstral mean and variance normalisation, applied inside the model.

Statistics are stored in WeNet's `global_cmvn` JSON format so that files move freely between
the two toolkits: {"mean_stat": [sum x], "var_stat": [sum x^2], "frame_num": N}.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn


def load_cmvn(path: str | Path, floor: float = 1.0e-20) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mean, inverse standard deviation) from a WeNet-style JSON statistics file."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text())
        mean_stat, var_stat, count = stats["mean_stat"], stats["var_stat"], float(stats["frame_num"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a CMVN statistics file ({err})") from err
    if count <= 0 or len(mean_stat) != len(var_stat):
        raise ValueError(f"{path}: frame_num must be positive and the stat vectors equally long")
    mean = [m / count for m in mean_stat]
    istd = [1.0 / math.sqrt(max(v / count - m * m, floor)) for m, v in zip(mean, var_stat)]
    return torch.tensor(mean), torch.tensor(istd)


class GlobalCMVN(nn.Module):
    """(x - mean) * istd over the feature axis; the statistics travel with the model's weights."""

    def __init__(self, mean: torch.Tensor, istd: torch.Tensor):
        super().__init__()
        if mean.shape != istd.shape or mean.dim() != 1:
            raise ValueError("mean and istd must be 1-D tensors of the same length")
        self.register_buffer("mean", mean.float())
        self.register_buffer("istd", istd.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 whatever the model's precision: fbank values around 10-15 minus
        # their mean lose most of their bits in bf16.
        return ((x.float() - self.mean.float()) * self.istd.float()).to(x.dtype)

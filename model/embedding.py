"""Sinusoidal position encodings: absolute (decoder) and relative (Conformer self-attention)."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[len(positions), dim] encodings of (possibly negative) float positions."""
    freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    angles = positions.float().unsqueeze(1) * freq
    pe = torch.empty(positions.numel(), dim, device=positions.device)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe


class PositionalEncoding(nn.Module):
    """x * sqrt(d) + PE(offset + t), as in the Transformer decoder."""

    def __init__(self, dim: int, dropout_rate: float):
        super().__init__()
        self.dim = dim
        self.xscale = math.sqrt(dim)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        pos = torch.arange(offset, offset + x.size(1), device=x.device)
        return self.dropout(x * self.xscale + sinusoid(pos, self.dim).to(x.dtype))


class RelPositionalEncoding(nn.Module):
    """Scales the input and returns encodings of the relative distances a chunk of queries sees.

    For `num_queries` queries that are the last frames of `num_keys` keys, distances run from
    num_keys - 1 down to -(num_queries - 1); `RelPositionMultiHeadedAttention` maps each
    (query, key) pair onto this list. Being relative, the encodings of a chunk are the same
    wherever the chunk sits in the utterance, which is what makes streaming with caches exact.
    """

    def __init__(self, dim: int, dropout_rate: float):
        super().__init__()
        self.dim = dim
        self.xscale = math.sqrt(dim)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, num_keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        num_queries = x.size(1)
        num_keys = num_queries if num_keys is None else num_keys
        distances = torch.arange(num_keys - 1, -num_queries, -1, device=x.device)
        pos_emb = sinusoid(distances, self.dim).to(x.dtype).unsqueeze(0)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)

"""Feed-forward blocks: the dense FFN and the factory that picks dense or MoE from the config."""
from __future__ import annotations

import torch
from torch import nn

from ..configs.model import FeedForwardConfig
from .activation import ACTIVATIONS
from .moe.layer import MoEFeedForward


class PositionwiseFeedForward(nn.Module):
    """Linear -> activation -> dropout -> linear, applied to every frame."""

    def __init__(self, dim: int, hidden_units: int, activation: str, dropout_rate: float):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden_units)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden_units, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                real_frames: torch.Tensor | None = None) -> torch.Tensor:
        # `valid` and `real_frames` are part of the feed-forward interface for the MoE's sake; a
        # dense FFN is frame-wise, so padded frames need no special care here.
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


def build_feed_forward(dim: int, cfg: FeedForwardConfig) -> nn.Module:
    if cfg.type == "dense":
        return PositionwiseFeedForward(dim, cfg.hidden_units, cfg.activation, cfg.dropout_rate)

    return MoEFeedForward(dim, cfg)

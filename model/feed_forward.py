"""Feed-forward blocks: the dense FFN and the factory that picks dense or MoE from the config."""
from __future__ import annotations

import torch
from torch import nn

from ..configs.model import FeedForwardConfig
from .activation import ACTIVATIONS
from .autocast import compute_dtype
from .moe.layer import MoEFeedForward
from .packed_linear import PackedWeights, packed_linear, packing_applies


class PositionwiseFeedForward(nn.Module):
    """Linear -> activation -> dropout -> linear, applied to every frame."""

    # Decoding's packed copies of the weights (packed_linear): derived, never saved or scripted.
    __jit_ignored_attributes__ = ["packed"]

    def __init__(self, dim: int, hidden_units: int, activation: str, dropout_rate: float):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden_units)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden_units, dim)
        self.packed = PackedWeights()

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                real_frames: torch.Tensor | None = None) -> torch.Tensor:
        # `valid` and `real_frames` are part of the feed-forward interface for the MoE's sake; a
        # dense FFN is frame-wise, so padded frames need no special care here.
        if not torch.jit.is_scripting():
            if packing_applies(self, x, compute_dtype(x)):
                return self._forward_packed(x)
        return self.w_2(self.dropout(self.activation(self.w_1(x))))

    @torch.jit.unused
    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        """Decoding on a CPU: both products on packed weights, as the MoE experts' are (the
        same kernels for both model kinds)."""
        dtype = compute_dtype(x)
        w1, w2 = self.packed.get((self.w_1.weight, self.w_2.weight), dtype,
                                 lambda: [self.w_1.weight, self.w_2.weight])
        h = self.activation(packed_linear(x.reshape(-1, x.size(-1)).to(dtype), w1, self.w_1.bias.to(dtype)))
        return packed_linear(h, w2, self.w_2.bias.to(dtype)).view(*x.shape[:-1], -1)


def build_feed_forward(dim: int, cfg: FeedForwardConfig) -> nn.Module:
    if cfg.type == "dense":
        return PositionwiseFeedForward(dim, cfg.hidden_units, cfg.activation, cfg.dropout_rate)

    return MoEFeedForward(dim, cfg)

"""The experts: E feed-forward networks stored as stacked weight tensors.

Stacked [E, ...] weights are what a grouped matrix multiply consumes, and what expert parallelism
slices: a rank holding experts [e0, e1) holds rows [e0, e1) of every tensor.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from u2moe.model.feed_forward import ACTIVATIONS
from u2moe.model.moe.backends import (GROUPED_LINEAR, ExpertGroups, all_experts_linear,
                                      backend_override, combine_top_k, compute_dtype,
                                      select_backend)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden_units: int, activation: str,
                 dropout_rate: float):
        super().__init__()
        self.num_experts = num_experts
        # "auto" or a name from backends.GROUPED_LINEAR, resolved per call (device, dtype), or
        # "export" (MoEFeedForward then takes the static-graph path, forward_top_k);
        # settable per layer, or for a whole run through U2MOE_EXPERT_BACKEND.
        self.backend = backend_override()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_units))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_units))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_units, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout_rate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert starts like an nn.Linear pair: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(weight.size(1))
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def shard(self, first: int, count: int) -> None:
        """Keep only experts [first, first + count): this rank's slice under expert parallelism."""
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, nn.Parameter(getattr(self, name).detach()[first:first + count].clone()))
        self.num_experts = count

    @torch.jit.unused  # group sizes are host values: TorchScript and ONNX use forward_top_k
    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [M, dim] grouped by expert (group sizes `tokens_per_expert`) -> [M, dim]."""
        groups = ExpertGroups(tokens_per_expert, x.size(0))
        dtype = compute_dtype(x)
        backend = select_backend(self.backend, x.device, dtype, tuple(self.w1.shape[1:]))
        if x.size(0) == 0:
            backend = "reference"  # nothing to compute; keeps the graph linked to the weights
        linear = GROUPED_LINEAR[backend]
        if backend != "reference":
            x = x.to(dtype)
        h = self.dropout(self.activation(linear(x, self.w1, self.b1, groups)))
        return linear(h, self.w2, self.b2, groups)

    def forward_top_k(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
                      ) -> torch.Tensor:
        """The export path: x [N, dim] unpermuted, expert_ids / weights [N, k] from the router ->
        [N, dim], the router-weighted sum of each frame's k experts. Same math as dispatch +
        `forward` + combine, as a static graph (backends.all_experts_linear)."""
        h = self.dropout(self.activation(all_experts_linear(x, self.w1, self.b1)))
        return combine_top_k(all_experts_linear(h, self.w2, self.b2), expert_ids, weights)

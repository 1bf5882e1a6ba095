"""The experts: E feed-forward networks stored as stacked weight tensors.

Stacked [E, ...] weights are what a grouped matrix multiply consumes, and what expert parallelism
slices: a rank holding experts [e0, e1) holds rows [e0, e1) of every tensor.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from u2moe.model.feed_forward import ACTIVATIONS


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden_units: int, activation: str,
                 dropout_rate: float):
        super().__init__()
        self.num_experts = num_experts
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

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [M, dim] grouped by expert (group sizes `tokens_per_expert`) -> [M, dim]."""
        outputs = []
        for e, xe in enumerate(torch.split(x, tokens_per_expert.tolist())):
            h = self.dropout(self.activation(torch.addmm(self.b1[e], xe, self.w1[e])))
            outputs.append(torch.addmm(self.b2[e], h, self.w2[e]))
        return torch.cat(outputs) if outputs else x

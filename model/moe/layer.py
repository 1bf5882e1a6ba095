"""The MoE feed-forward block, a drop-in replacement for `PositionwiseFeedForward`."""
from __future__ import annotations

import torch
from torch import nn

from u2moe.model.config import FeedForwardConfig
from u2moe.model.moe.dispatcher import SortedTokenDispatcher
from u2moe.model.moe.experts import GroupedExperts
from u2moe.model.moe.router import TopKRouter


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, cfg: FeedForwardConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.router_noise_std,
                                 cfg.aux_loss_weight)
        self.dispatcher = SortedTokenDispatcher(cfg.num_experts)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.hidden_units, cfg.activation,
                                      cfg.dropout_rate)
        # Set by every forward, read by the trainer: frames routed to each expert, and the
        # weighted balancing loss (None unless enabled).
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D]; valid [B, T] (True = real frame). Padded frames get exactly zero output."""
        flat = x.reshape(-1, x.size(-1))
        index = None
        if valid is not None:
            # Padding is removed before routing: it costs no expert compute and skews no load.
            index = valid.reshape(-1).nonzero().squeeze(1)
            tokens = flat.index_select(0, index)
        else:
            tokens = flat
        routing = self.router(tokens)
        permuted, tokens_per_expert, state = self.dispatcher.dispatch(tokens, routing)
        y = self.dispatcher.combine(self.experts(permuted, tokens_per_expert), state)
        self.last_tokens_per_expert = tokens_per_expert.detach()
        self.aux_loss = routing.aux_loss
        if index is not None:
            y = flat.new_zeros(flat.shape).index_copy(0, index, y)
        return y.view_as(x)

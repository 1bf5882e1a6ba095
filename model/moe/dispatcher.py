"""Token dispatch: permute routed frames into per-expert groups, and back."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from u2moe.model.moe.router import Routing


@dataclass
class DispatchState:
    token_index: torch.Tensor  # [N*k] source frame of each row of the permuted batch
    weights: torch.Tensor  # [N*k] router weight of each row
    num_tokens: int


class SortedTokenDispatcher:
    """Dropless, single-process dispatch: a stable sort of the (frame, expert) pairs by expert.

    Every routed pair is kept (no capacity factor), so the experts see exactly the frames the
    router chose; `tokens_per_expert` tells the experts where each group starts.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        top_k = routing.expert_ids.size(1)
        flat_ids = routing.expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_index = order // top_k
        tokens_per_expert = torch.bincount(flat_ids, minlength=self.num_experts)
        state = DispatchState(token_index, routing.weights.reshape(-1)[order], x.size(0))
        return x[token_index], tokens_per_expert, state

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        weighted = y * state.weights.unsqueeze(1).to(y.dtype)
        out = y.new_zeros(state.num_tokens, y.size(1))
        return out.index_add(0, state.token_index, weighted)

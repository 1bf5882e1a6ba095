"""Token dispatch: permute routed frames into per-expert groups, and back."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from u2moe.model.moe.router import Routing, count_per_expert


@dataclass
class DispatchState:
    order: torch.Tensor  # [N*k] (frame, slot) pair of each row of the permuted batch, as frame*k+slot
    weights: torch.Tensor  # [N, k] router weights
    num_tokens: int
    routed_counts: torch.Tensor  # [E] pairs of this rank's frames routed to each global expert


class SortedTokenDispatcher:
    """Dropless, single-process dispatch: a stable sort of the (frame, expert) pairs by expert.

    Every routed pair is kept (no capacity factor), so the experts see exactly the frames the
    router chose; `tokens_per_expert` tells the experts where each group starts. Both directions
    are gathers/scatters through one permutation: no atomics, and the sum over the k experts
    of a frame is an ordinary reduction, so results do not depend on thread scheduling.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        top_k = routing.expert_ids.size(1)
        flat_ids = routing.expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        tokens_per_expert = count_per_expert(flat_ids, self.num_experts)
        state = DispatchState(order, routing.weights, x.size(0), tokens_per_expert)
        return x.index_select(0, order // top_k), tokens_per_expert, state

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        top_k = state.weights.size(1)
        pairs = y.new_empty(state.num_tokens * top_k, y.size(1)).index_copy_(0, state.order, y)
        weighted = pairs.view(state.num_tokens, top_k, y.size(1)) * state.weights.to(y.dtype).unsqueeze(2)
        return weighted.sum(dim=1)

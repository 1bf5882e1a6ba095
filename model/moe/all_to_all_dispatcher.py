"""Expert-parallel dispatch: frames travel to the rank that holds their expert, and back.

Rank r of an expert-parallel group of size P holds global experts [r*L, (r+1)*L), L = E/P.
Locally the frames are sorted by global expert, which also sorts them by destination rank;
the per-expert counts are exchanged first, so that the frames themselves go in one
variable-split all-to-all with no padding to a common capacity. Ranks with no frames (for an
expert, or at all) send and receive empty splits and still take part in every collective,
forward and backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from u2moe.model.moe.dispatcher import DispatchState, SortedTokenDispatcher
from u2moe.model.moe.router import Routing


@dataclass
class AllToAllState:
    local: DispatchState
    regroup: torch.Tensor  # received row order -> rows grouped by local expert
    send_splits: list[int]
    recv_splits: list[int]

    @property
    def routed_counts(self) -> torch.Tensor:
        return self.local.routed_counts


class AllToAllTokenDispatcher:
    def __init__(self, num_experts: int, group: dist.ProcessGroup):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_local_experts = num_experts // self.ep_size
        self.local = SortedTokenDispatcher(num_experts)

    def dispatch(self, x: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        permuted, tokens_per_expert, local_state = self.local.dispatch(x, routing)
        # recv_counts[s, e]: frames rank s sends to this rank's local expert e.
        recv_counts = torch.empty_like(tokens_per_expert)
        dist.all_to_all_single(recv_counts, tokens_per_expert, group=self.group)
        recv_counts = recv_counts.view(self.ep_size, self.num_local_experts)
        # The one host sync of the layer: all-to-all split sizes live on the host.
        send_splits, recv_splits = torch.stack([
            tokens_per_expert.view(self.ep_size, self.num_local_experts).sum(1),
            recv_counts.sum(1)]).tolist()
        received = all_to_all_single(permuted.new_empty(sum(recv_splits), x.size(1)), permuted,
                                     recv_splits, send_splits, group=self.group)
        # Received rows come source rank by source rank; the experts want them expert by expert.
        local_ids = torch.arange(self.num_local_experts, device=x.device).repeat(self.ep_size)
        row_expert = torch.repeat_interleave(local_ids, recv_counts.reshape(-1),
                                             output_size=received.size(0))
        regroup = torch.argsort(row_expert, stable=True)
        state = AllToAllState(local_state, regroup, send_splits, recv_splits)
        return received.index_select(0, regroup), recv_counts.sum(0), state

    def combine(self, y: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        by_source = y.new_empty(y.shape).index_copy_(0, state.regroup, y)
        returned = all_to_all_single(y.new_empty(sum(state.send_splits), y.size(1)), by_source,
                                     state.send_splits, state.recv_splits, group=self.group)
        return self.local.combine(returned, state.local)

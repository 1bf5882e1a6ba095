"""Expert-parallel dispatch: frames travel to the rank that holds their expert, and back.

Rank r of an expert-parallel group of size P holds global experts [r*L, (r+1)*L), L = E/P.
Locally the frames are sorted by global expert, which also sorts them by destination rank;
the per-expert counts are exchanged first, so that the frames themselves go in one
variable-split all-to-all with no padding to a common capacity. Ranks with no frames (for an
expert, or at all) send and receive empty splits and still take part in every collective,
forward and backward.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backends import ExpertGroups
from .dispatcher import DispatchState, SortedTokenDispatcher
from .router import Routing


class AllToAllTimer:
    """Time spent in the expert all-to-alls, forward and backward, of the dispatchers it is
    given to (`U2Model.time_expert_exchanges`; the trainer reports its share of step time). On a
    GPU, CUDA events around each collective on the current stream, read only when `take` is
    called; on the CPU, wall time."""

    def __init__(self) -> None:
        self.calls = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    @contextmanager
    def time(self, device: torch.device) -> Iterator[None]:
        self.calls += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            started = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - started

    def take(self) -> float:
        """Seconds since the last take (waits for the recorded GPU events)."""
        seconds = self._seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1000
        self._events.clear()
        self._seconds = 0.0
        return seconds


def _timed(timer: AllToAllTimer | None, device: torch.device) -> AbstractContextManager:
    return nullcontext() if timer is None else timer.time(device)


def _exchange(x: torch.Tensor, out_rows: int, out_splits: list[int], in_splits: list[int],
              group: dist.ProcessGroup, timer: AllToAllTimer | None) -> torch.Tensor:
    out = x.new_empty(out_rows, *x.shape[1:])
    with _timed(timer, x.device):
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Variable-split all-to-all whose backward is the reverse exchange (timed both ways)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                group: dist.ProcessGroup, timer: AllToAllTimer | None) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.timer = (recv_splits, send_splits), group, timer
        return _exchange(x, sum(recv_splits), recv_splits, send_splits, group, timer)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        recv_splits, send_splits = ctx.splits
        return _exchange(grad, sum(send_splits), send_splits, recv_splits, ctx.group, ctx.timer), None, None, None, None


@dataclass
class AllToAllState:
    local: DispatchState
    regroup: torch.Tensor  # received row order -> rows grouped by local expert
    send_splits: list[int]
    recv_splits: list[int]

    @property
    def groups(self) -> ExpertGroups:
        """This rank's frames' groups over the global experts (before the exchange)."""
        return self.local.groups


class AllToAllTokenDispatcher:
    def __init__(self, num_experts: int, group: dist.ProcessGroup):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_local_experts = num_experts // self.ep_size
        self.local = SortedTokenDispatcher(num_experts)
        self.timer: AllToAllTimer | None = None  # set by U2Model.time_expert_exchanges

    def dispatch(self, x: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, ExpertGroups, AllToAllState]:
        if routing.skip is not None:  # the exchange's split sizes are host reads anyway
            raise ValueError("skipped frames (MoEFeedForward.use_static_shapes) need expert parallelism 1")
        permuted, local_groups, local_state = self.local.dispatch(x, routing)
        tokens_per_expert = local_groups.counts
        # recv_counts[s, e]: frames rank s sends to this rank's local expert e.
        recv_counts = torch.empty_like(tokens_per_expert)
        with _timed(self.timer, x.device):
            dist.all_to_all_single(recv_counts, tokens_per_expert, group=self.group)
        recv_counts = recv_counts.view(self.ep_size, self.num_local_experts)
        # The one host sync of the layer: all-to-all split sizes live on the host.
        send_splits, recv_splits = torch.stack([
            tokens_per_expert.view(self.ep_size, self.num_local_experts).sum(1),
            recv_counts.sum(1)]).tolist()
        received = _AllToAll.apply(permuted, recv_splits, send_splits, self.group, self.timer)
        # Received rows come source rank by source rank; the experts want them expert by expert.
        local_ids = torch.arange(self.num_local_experts, device=x.device).repeat(self.ep_size)
        row_expert = torch.repeat_interleave(local_ids, recv_counts.reshape(-1),
                                             output_size=received.size(0))
        sorted_ids, regroup = torch.sort(row_expert, stable=True)
        state = AllToAllState(local_state, regroup, send_splits, recv_splits)
        groups = ExpertGroups(recv_counts.sum(0).cumsum(0).to(torch.int32), sorted_ids)
        return received.index_select(0, regroup), groups, state

    def combine(self, y: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        by_source = y.new_empty(y.shape).index_copy_(0, state.regroup, y)
        returned = _AllToAll.apply(by_source, state.send_splits, state.recv_splits, self.group, self.timer)
        return self.local.combine(returned, state.local)

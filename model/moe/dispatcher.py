"""Token dispatch: permute routed frames into per-expert groups, and back."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import ExpertGroups, triton_kernels_for
from .router import Routing
from .triton_permute import TritonPermuteOps


class TorchPermuteOps:
    """The dispatcher's gathers and weighted sums in PyTorch: the CPU path, and the reference of
    the single-pass Triton kernels (`triton_permute.TritonPermuteOps`) used on CUDA."""

    @staticmethod
    def gather_sum(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None,
                   limit: torch.Tensor | None = None) -> torch.Tensor:
        """src [R, d], rows [N, k] (rows of src), weights [N, k] or None (all ones) -> [N, d]:
        out[n] = sum over slots j of weights[n, j] * src[rows[n, j]], in slot order. With limit
        (a one-element tensor), rows from limit on count as zero whatever they hold (unrouted
        rows, past the experts' groups: never written)."""
        pairs = src.index_select(0, rows.reshape(-1)).view(*rows.shape, src.size(1))
        if weights is not None:
            pairs = pairs * weights.to(src.dtype).unsqueeze(2)
        if limit is not None:
            pairs = pairs.masked_fill((rows >= limit).unsqueeze(2), 0)
        return pairs.sum(dim=1)

    @staticmethod
    def scale_rows(src: torch.Tensor, frames: torch.Tensor, weights: torch.Tensor,
                   y: torch.Tensor | None, limit: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """src [N, d], frames / weights [R] -> (out [R, d] = weights * src[frames], and with y
        [R, d] the fp32 dot products <y[r], src[frames[r]]>, zero from row `limit` on)."""
        g = src.index_select(0, frames)
        dot = None if y is None else (y * g).sum(dim=1).float()
        if dot is not None and limit is not None:
            dot = dot.masked_fill(torch.arange(dot.numel(), device=dot.device) >= limit, 0)
        return g * weights.to(src.dtype).unsqueeze(1), dot


def permute_ops(x: torch.Tensor) -> type:
    """`triton_permute.TritonPermuteOps` where `triton_kernels_for(x)`, `TorchPermuteOps` otherwise."""
    if triton_kernels_for(x):
        return TritonPermuteOps
    return TorchPermuteOps


class _Permute(torch.autograd.Function):
    """rows = x[row_frame]: each (frame, slot) pair's frame, in expert order. The backward sums
    each frame's k rows, gathered through `pair_rows` (no atomics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: DispatchState) -> torch.Tensor:
        ctx.save_for_backward(state.pair_rows, state.routed)
        ctx.ops = state.ops
        return x.index_select(0, state.row_frame)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pair_rows, routed = ctx.saved_tensors
        return ctx.ops.gather_sum(grad, pair_rows, None, routed), None


class _Unpermute(torch.autograd.Function):
    """out[n] = sum over slots j of weights[n, j] * y[row of pair (n, j)], in slot order."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, state: DispatchState) -> torch.Tensor:
        ctx.save_for_backward(y, weights, state.order, state.row_frame, state.routed)
        ctx.ops = state.ops
        return state.ops.gather_sum(y, state.pair_rows, weights, state.routed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, weights, order, row_frame, routed = ctx.saved_tensors
        row_weights = weights.reshape(-1).index_select(0, order)
        grad_y, dot = ctx.ops.scale_rows(grad.to(y.dtype), row_frame, row_weights,
                                         y if ctx.needs_input_grad[1] else None, routed)
        grad_weights = None
        if dot is not None:
            grad_weights = dot.new_empty(dot.shape).index_copy_(0, order, dot).view_as(weights)
            grad_weights = grad_weights.to(weights.dtype)
        return grad_y, grad_weights, None


@dataclass
class DispatchState:
    order: torch.Tensor  # [N*k] (frame, slot) pair of each row of the permuted batch, as frame*k+slot
    row_frame: torch.Tensor  # [N*k] frame of each row: order // k
    pair_rows: torch.Tensor  # [N, k] row of each (frame, slot) pair: the inverse of order
    weights: torch.Tensor  # [N, k] router weights
    groups: ExpertGroups  # the permuted rows' groups, over all E (global) experts
    ops: type  # TorchPermuteOps or triton_permute.TritonPermuteOps
    # [1] int32 rows in the groups, where skipped frames' rows follow them (else None): the
    # experts write no output there (torch._grouped_mm leaves such rows as it found them).
    routed: torch.Tensor | None = None


class SortedTokenDispatcher:
    """Dropless, single-process dispatch: a stable sort of the (frame, expert) pairs by expert.

    Every routed pair is kept (no capacity factor), so the experts see exactly the frames the
    router chose; `ExpertGroups` tells the experts where each group starts. Both directions are
    gathers through one permutation and its inverse, each one autograd node: no atomics, and the
    sum over the k experts of a frame is an ordinary reduction, so results do not depend on thread
    scheduling.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, ExpertGroups, DispatchState]:
        """Frames the router skipped (`Routing.skip`: padding kept in the batch for static
        shapes, CUDA graphs) have expert id E: their rows sort after every group, where the
        grouped products stop, and the combine reads none of them (output zero). Shapes stay
        fixed and nothing is read on the host, yet no expert computes padding."""
        ids = routing.expert_ids
        # One-byte keys: CUDA's radix sort makes a pass per key byte, 8 for int64 ids.
        key_dtype = torch.uint8 if self.num_experts < 256 else torch.int32
        sorted_ids, order = torch.sort(ids.reshape(-1).to(key_dtype), stable=True)
        groups = ExpertGroups.from_sorted(sorted_ids.long(), self.num_experts)
        pair_rows = torch.empty_like(order).index_copy_(
            0, order, torch.arange(order.numel(), device=order.device)).view(ids.shape)
        state = DispatchState(order, torch.div(order, ids.size(1), rounding_mode="floor"), pair_rows,
                              routing.weights, groups, permute_ops(x),
                              None if routing.skip is None else groups.offsets[-1:])
        return _Permute.apply(x, state), groups, state

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return _Unpermute.apply(y, state.weights, state)

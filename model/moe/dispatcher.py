"""Token dispatch: permute routed frames into per-expert groups, and back."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from u2moe.model.moe.backends import ExpertGroups
from u2moe.model.moe.router import Routing


class _Permute(torch.autograd.Function):
    """rows = x[order // k]: each (frame, slot) pair's frame, in expert order. The backward
    puts the rows back in pair order and sums each frame's k rows (no atomics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return x.index_select(0, torch.div(order, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        pairs = grad.new_empty(grad.shape).index_copy_(0, order, grad)
        return pairs.view(-1, ctx.top_k, grad.size(1)).sum(dim=1), None, None


class _Unpermute(torch.autograd.Function):
    """out[n] = sum over slots j of weights[n, j] * y[row of pair (n, j)], in slot order."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = weights.shape
        pairs = y.new_empty(y.shape).index_copy_(0, order, y).view(num_tokens, top_k, y.size(1))
        w = weights.to(y.dtype)
        ctx.save_for_backward(pairs, w, order)
        ctx.weights_dtype = weights.dtype
        return (pairs * w.unsqueeze(2)).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pairs, w, order = ctx.saved_tensors
        grad = grad.to(pairs.dtype)
        grad_weights = None
        if ctx.needs_input_grad[2]:
            grad_weights = (pairs * grad.unsqueeze(1)).sum(dim=2).to(ctx.weights_dtype)
        grad_y = (grad.unsqueeze(1) * w.unsqueeze(2)).view(-1, grad.size(1)).index_select(0, order)
        return grad_y, None, grad_weights


@dataclass
class DispatchState:
    order: torch.Tensor  # [N*k] (frame, slot) pair of each row of the permuted batch, as frame*k+slot
    weights: torch.Tensor  # [N, k] router weights
    groups: ExpertGroups  # the permuted rows' groups, over all E (global) experts


class SortedTokenDispatcher:
    """Dropless, single-process dispatch: a stable sort of the (frame, expert) pairs by expert.

    Every routed pair is kept (no capacity factor), so the experts see exactly the frames the
    router chose; `ExpertGroups` tells the experts where each group starts. Both directions are
    gathers/scatters through one permutation, each one autograd node: no atomics, and the sum
    over the k experts of a frame is an ordinary reduction, so results do not depend on thread
    scheduling.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, ExpertGroups, DispatchState]:
        sorted_ids, order = torch.sort(routing.expert_ids.reshape(-1), stable=True)
        groups = ExpertGroups.from_sorted(sorted_ids, self.num_experts)
        state = DispatchState(order, routing.weights, groups)
        return _Permute.apply(x, order, routing.expert_ids.size(1)), groups, state

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return _Unpermute.apply(y, state.order, state.weights)

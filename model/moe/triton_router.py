"""The router's top-k and softmax over the chosen logits as one Triton kernel each way (CUDA).

`router.torch_top_k_softmax` (topk, then softmax; the CPU path and the reference) takes a top-k
select, a sort of the selected pairs, a softmax, and in the backward a softmax backward and a
scatter into zeros: five kernels over [N, E] for what is a few registers a frame. Here a program
takes a block of frames, each frame's E logits in registers; the top k come out in descending
order, ties to the lower expert id.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FRAMES_PER_PROGRAM = 64


@triton.jit
def _frame_block(N, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's frames (rows), the expert columns, and which rows exist."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, tl.arange(0, BLOCK_E), rows < N


@triton.jit
def _next_best(left, cols, BLOCK_E: tl.constexpr):
    """Each frame's largest remaining logit, its expert (the lower id on ties), and the logits
    without it."""
    best = tl.max(left, axis=1)
    pick = tl.min(tl.where(left == best[:, None], cols[None, :], BLOCK_E), axis=1)
    return best, pick, tl.where(cols[None, :] == pick[:, None], float("-inf"), left)


@triton.jit
def _top_k_softmax_kernel(logits_ptr, ids_ptr, weights_ptr, N, E, stride,
                          TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    rows, cols, row_mask = _frame_block(N, BLOCK_N, BLOCK_E)
    logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :],
                     mask=row_mask[:, None] & (cols[None, :] < E), other=float("-inf"))
    logits = tl.where(row_mask[:, None], logits, 0.0)  # rows past N: finite, never stored
    top = tl.max(logits, axis=1)
    # Two passes over the k picks: the first sums the softmax's denominator, the second writes.
    left = logits
    denominator = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for _ in tl.static_range(TOP_K):
        best, pick, left = _next_best(left, cols, BLOCK_E)
        denominator += tl.exp(best - top)
    left = logits
    for j in tl.static_range(TOP_K):
        best, pick, left = _next_best(left, cols, BLOCK_E)
        tl.store(ids_ptr + rows * TOP_K + j, pick.to(tl.int64), mask=row_mask)
        tl.store(weights_ptr + rows * TOP_K + j, tl.exp(best - top) / denominator, mask=row_mask)


@triton.jit
def _top_k_softmax_backward_kernel(ids_ptr, weights_ptr, grad_ptr, out_ptr, N, E,
                                   TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    rows, cols, row_mask = _frame_block(N, BLOCK_N, BLOCK_E)
    # Softmax backward over the k weights s: d_j = s_j * (g_j - sum_i g_i s_i), at logit ids_j.
    dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        s = tl.load(weights_ptr + rows * TOP_K + j, mask=row_mask, other=0.0)
        g = tl.load(grad_ptr + rows * TOP_K + j, mask=row_mask, other=0.0).to(tl.float32)
        dot += s * g
    out = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        s = tl.load(weights_ptr + rows * TOP_K + j, mask=row_mask, other=0.0)
        g = tl.load(grad_ptr + rows * TOP_K + j, mask=row_mask, other=0.0).to(tl.float32)
        pick = tl.load(ids_ptr + rows * TOP_K + j, mask=row_mask, other=0)
        out += tl.where(cols[None, :] == pick[:, None], (s * (g - dot))[:, None], 0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], out,
             mask=row_mask[:, None] & (cols[None, :] < E))


class TritonTopKSoftmax(torch.autograd.Function):
    """logits [N, E] fp32 -> (expert_ids [N, k] int64, weights [N, k] fp32), differentiable in
    the weights."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int):
        logits = logits.contiguous()
        num, experts = logits.shape
        ids = logits.new_empty(num, top_k, dtype=torch.int64)
        weights = logits.new_empty(num, top_k)
        if num:
            _top_k_softmax_kernel[(triton.cdiv(num, _FRAMES_PER_PROGRAM),)](
                logits, ids, weights, num, experts, logits.stride(0), TOP_K=top_k,
                BLOCK_N=_FRAMES_PER_PROGRAM, BLOCK_E=triton.next_power_of_2(experts))
        ctx.save_for_backward(ids, weights)
        ctx.experts = experts
        ctx.mark_non_differentiable(ids)
        return ids, weights

    @staticmethod
    def backward(ctx, grad_ids, grad_weights):
        if grad_weights is None:
            return None, None
        ids, weights = ctx.saved_tensors
        num, top_k = ids.shape
        out = weights.new_empty(num, ctx.experts)
        if num:
            _top_k_softmax_backward_kernel[(triton.cdiv(num, _FRAMES_PER_PROGRAM),)](
                ids, weights, grad_weights.contiguous(), out, num, ctx.experts, TOP_K=top_k,
                BLOCK_N=_FRAMES_PER_PROGRAM, BLOCK_E=triton.next_power_of_2(ctx.experts))
        return out, None

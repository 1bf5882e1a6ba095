"""Grouped GEMM in Triton for sm80/sm86/sm89, where `torch._grouped_mm` has no fast kernel.

Rows of `x` come grouped by expert (group ends `offsets`, int32, on the device). Two kernels:

- `_grouped_rows_kernel`: out[rows of e] = x[rows of e] @ w[e] (+ b[e]). Used for the forward and
  for the input gradient (with w transposed through its strides, no copy).
- `_grouped_weight_grad_kernel`: dw[e] = x[rows of e]^T @ g[rows of e]; `_group_row_sum_kernel`:
  db[e] = the sum of g[rows of e]. Apart, because summing g inside the product's loop slows the
  product (its tile of g then also lives in registers, and every K tile repeats the sum).

Neither reads the group sizes on the host: the row-tile grid is sized for the worst case
(ceil(M / BLOCK_M) + E tiles, one partial tile per group at most) and each program finds its
expert from `offsets`; surplus programs do nothing. This keeps the training step free of host
syncs, the reason `torch._grouped_mm`'s fallback is slow on these cards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _configs(blocks: list[tuple[int, int, int, int, int]], names: tuple[str, str, str]
             ) -> list[triton.Config]:
    """(three block sizes, num_warps, num_stages) tuples -> triton.Config list."""
    return [triton.Config(dict(zip(names, b[:3])), num_warps=b[3], num_stages=b[4]) for b in blocks]


# Tile shapes timed on the first call for each layer shape (the autotuning keys below), the
# fastest kept for the run: the consumer cards this path serves (sm80/86/89) differ in shared
# memory and SM count, and any one fixed tile leaves the weight-gradient kernel with too few
# programs at some model width. Shapes too large for a card's shared memory are skipped by Triton.
# The last two entries of each list are large tiles, for cards with the shared memory and SMs to
# fill them (an H100 picks them).
_ROWS_CONFIGS = _configs([(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                          (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                          (128, 256, 64, 8, 4), (64, 256, 64, 8, 4)],
                         ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
_WGRAD_CONFIGS = _configs([(64, 128, 128, 8, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3),
                           (64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (32, 128, 128, 8, 4),
                           (64, 128, 256, 8, 3), (32, 128, 256, 8, 4)],
                          ("BLOCK_M", "BLOCK_K", "BLOCK_N"))


def _autotune(configs: list[triton.Config], key: list[str]):
    # Triton's CPU interpreter (the tests on machines without a GPU) cannot time kernels; there
    # the first configuration runs (tests/test_moe_backends.py runs each one in turn).
    if triton.knobs.runtime.interpret:
        configs = configs[:1]
    # cache_results: the choice is kept on disk with Triton's kernel cache, so later runs skip the timing.
    return triton.autotune(configs, key=key, cache_results=True)


@_autotune(_ROWS_CONFIGS, key=["N", "K", "stride_wn", "NUM_EXPERTS", "HAS_BIAS"])
@triton.jit
def _grouped_rows_kernel(x_ptr, w_ptr, b_ptr, out_ptr, offsets_ptr, M, N, K,
                         stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om,
                         NUM_EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which group does row tile `pid_m` fall in? Tiles are numbered group after group.
    # Loop-carried scalars start as int32 tensors so that their type stays fixed in the loop.
    zero = pid_m * 0
    expert = zero
    row_start = zero
    row_end = zero
    tiles_before = zero
    group_start = zero
    for e in tl.static_range(NUM_EXPERTS):
        group_end = tl.load(offsets_ptr + e)
        n_tiles = tl.cdiv(group_end - group_start, BLOCK_M)
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, group_start + (pid_m - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(hit, group_end, row_end)
        tiles_before += n_tiles
        group_start = group_end
    active = row_end > row_start

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.where(active, tl.cdiv(K, BLOCK_K), 0)
    for k in range(0, k_tiles):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert * N + offs_n, mask=mask_n & active, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _group_rows(offsets_ptr, expert):
    """[start, end) of `expert`'s rows, from the group ends `offsets`."""
    end = tl.load(offsets_ptr + expert)
    return tl.where(expert > 0, tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0), 0), end


@_autotune(_WGRAD_CONFIGS, key=["N", "K"])
@triton.jit
def _grouped_weight_grad_kernel(x_ptr, g_ptr, dw_ptr, offsets_ptr, N, K,
                                stride_xm, stride_xk, stride_gm, stride_gn,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    expert = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    row_start, row_end = _group_rows(offsets_ptr, expert)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m in range(row_start, row_end, BLOCK_M):
        rows = m + offs_m
        mask_m = rows < row_end
        # Loaded row-major (coalesced along K) and transposed in registers.
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tl.trans(x), g, acc)
    dw_ptrs = dw_ptr + expert * K * N + offs_k[:, None] * N + offs_n[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


@triton.jit
def _group_row_sum_kernel(g_ptr, out_ptr, offsets_ptr, N, stride_gm, stride_gn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    expert = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_start, row_end = _group_rows(offsets_ptr, expert)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m in range(row_start, row_end, BLOCK_M):
        rows = m + tl.arange(0, BLOCK_M)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_gm + offs_n[None, :] * stride_gn,
                    mask=(rows < row_end)[:, None] & mask_n[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(out_ptr + expert * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def grouped_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, offsets: torch.Tensor,
                 transpose_w: bool) -> torch.Tensor:
    num_experts = w.size(0)
    k_dim, n_dim = (w.size(2), w.size(1)) if transpose_w else (w.size(1), w.size(2))
    stride_wk, stride_wn = (w.stride(2), w.stride(1)) if transpose_w else (w.stride(1), w.stride(2))
    out = torch.empty(x.size(0), n_dim, device=x.device, dtype=x.dtype)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(x.size(0), meta["BLOCK_M"]) + num_experts, triton.cdiv(n_dim, meta["BLOCK_N"]))

    _grouped_rows_kernel[grid](
        x, w, b if b is not None else w, out, offsets, x.size(0), n_dim, k_dim,
        x.stride(0), x.stride(1), w.stride(0), stride_wk, stride_wn, out.stride(0),
        NUM_EXPERTS=num_experts, HAS_BIAS=b is not None)
    return out


def weight_grad(x: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dw [E, K, N], db [E, N]) in x's dtype, E = offsets.numel()."""
    num_experts, k_dim, n_dim = offsets.numel(), x.size(1), g.size(1)
    dw = torch.empty(num_experts, k_dim, n_dim, device=x.device, dtype=x.dtype)
    db = torch.empty(num_experts, n_dim, device=x.device, dtype=x.dtype)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (num_experts, triton.cdiv(k_dim, meta["BLOCK_K"]), triton.cdiv(n_dim, meta["BLOCK_N"]))

    _grouped_weight_grad_kernel[grid](
        x, g, dw, offsets, n_dim, k_dim, x.stride(0), x.stride(1), g.stride(0), g.stride(1))
    # A program per expert and 64 columns (E * N / 64 programs), each summing its expert's rows.
    _group_row_sum_kernel[(num_experts, triton.cdiv(n_dim, 64))](
        g, db, offsets, n_dim, g.stride(0), g.stride(1), BLOCK_M=64, BLOCK_N=64)
    return dw, db

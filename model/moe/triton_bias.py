"""The `grouped_mm` backend's bias handling as single-pass Triton kernels (CUDA).

The experts' first layer multiplies its bias in: x gets columns of ones, w the bias as an extra
row; the second layer adds its bias to each row from the row's expert (`backends.TorchBiasOps`
spells all three out in PyTorch, the CPU path and the reference). In PyTorch the widened x is a
strided copy (a non-vectorised kernel at about half the bandwidth), the widened w a concatenation
with an expanded zero block, and the bias add a gather of [M, N] bias rows and an add; here each
is one pass that reads its sources once and writes whole rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_permute import row_block


@triton.jit
def _widen_rows_kernel(x_ptr, out_ptr, K, WIDE, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=1.0)
    tl.store(out_ptr + row * WIDE + cols, v, mask=cols < WIDE)


@triton.jit
def _widen_weight_kernel(w_ptr, b_ptr, out_ptr, K, N, WIDE_K, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # a row of out [E, WIDE_K, N]
    expert, r = row // WIDE_K, row % WIDE_K
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # Row r < K is w[expert, r], row K the bias, the rest zeros: masked loads, no branches.
    v = tl.load(w_ptr + (expert * K + r) * N + cols, mask=mask & (r < K), other=0.0)
    v += tl.load(b_ptr + expert * N + cols, mask=mask & (r == K), other=0.0)
    tl.store(out_ptr + row * N + cols, v, mask=mask)


@triton.jit
def _add_group_bias_kernel(y_ptr, b_ptr, expert_ptr, N, num_experts, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    expert = tl.load(expert_ptr + row)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask)
    bias = tl.load(b_ptr + expert * N + cols, mask=mask & (expert < num_experts), other=0.0)  # E: unrouted
    tl.store(y_ptr + row * stride_y + cols, y + bias, mask=mask)


class TritonBiasOps:
    @staticmethod
    def widen_rows(x: torch.Tensor, columns: int) -> torch.Tensor:
        """x [M, K] -> [M, K + columns]: x, then columns of ones."""
        rows, k = x.shape
        out = x.new_empty(rows, k + columns)
        if rows:
            block, warps = row_block(k + columns)
            _widen_rows_kernel[(rows, triton.cdiv(k + columns, block))](
                x, out, k, k + columns, x.stride(0), BLOCK=block, num_warps=warps)
        return out

    @staticmethod
    def widen_weight(w: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
        """w [E, K, N], b [E, N] -> [E, K + rows, N]: w, the bias as row K, then zero rows."""
        w, b = w.contiguous(), b.contiguous()
        experts, k, n = w.shape
        out = w.new_empty(experts, k + rows, n)
        block, warps = row_block(n)
        _widen_weight_kernel[(experts * (k + rows), triton.cdiv(n, block))](
            w, b, out, k, n, k + rows, BLOCK=block, num_warps=warps)
        return out

    @staticmethod
    def add_group_bias_(y: torch.Tensor, b: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        """y [M, N] += b[row_expert] (b [E, N]; unrouted rows, expert E, get none), in place;
        returns y."""
        rows, n = y.shape
        if rows:
            block, warps = row_block(n)
            _add_group_bias_kernel[(rows, triton.cdiv(n, block))](
                y, b.contiguous(), row_expert, n, b.size(0), y.stride(0), BLOCK=block, num_warps=warps)
        return y

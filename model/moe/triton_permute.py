"""The token dispatcher's row gathers and weighted sums as single-pass Triton kernels (CUDA).

`dispatcher.TorchPermuteOps` spells each out in PyTorch: a gather into a [pairs, d] copy, a
broadcast multiply and a reduction, three passes over the rows and one more copy. Here each is one
pass: a program per output row reads its source rows once and accumulates in fp32. Same values
up to rounding (the PyTorch path multiplies in the rows' dtype).

- `gather_sum`: out[n] = sum over j of w[n, j] * src[rows[n, j]] (the combine; the permute's backward).
- `scale_rows`: out[r] = w[r] * src[frame[r]] and dot[r] = <y[r], src[frame[r]]> (the combine's backward).

Both take an optional limit (a device scalar): rows of src (or y) from it on are unrouted, hold
no expert output, and count as zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_sum_kernel(src_ptr, rows_ptr, w_ptr, limit_ptr, out_ptr, D, stride_src, stride_out,
                       TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(rows_ptr + n * TOP_K + j).to(tl.int64)
        live = mask
        if HAS_LIMIT:
            live = mask & (row < tl.load(limit_ptr))
        v = tl.load(src_ptr + row * stride_src + cols, mask=live, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            v *= tl.load(w_ptr + n * TOP_K + j).to(tl.float32)
        acc += v
    tl.store(out_ptr + n.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(src_ptr, frame_ptr, w_ptr, y_ptr, limit_ptr, out_ptr, dot_ptr, D, stride_src,
                       stride_y, stride_out, HAS_DOT: tl.constexpr, HAS_LIMIT: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    frame = tl.load(frame_ptr + r).to(tl.int64)
    w = tl.load(w_ptr + r).to(tl.float32)
    # Rows from the limit on are unrouted: y holds no output there, and their dot is zero.
    y_live = r >= 0
    if HAS_LIMIT:
        y_live = r < tl.load(limit_ptr)
    dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < D
        g = tl.load(src_ptr + frame * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * stride_out + cols, (g * w).to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_DOT:
            dot += g * tl.load(y_ptr + r * stride_y + cols, mask=mask & y_live, other=0.0).to(tl.float32)
    if HAS_DOT:
        tl.store(dot_ptr + r, tl.sum(dot, axis=0))


def row_block(dim: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): a whole row up to 1024 columns, 8 columns (16 bytes of bf16) a thread."""
    block = min(1024, triton.next_power_of_2(dim))
    return block, max(1, block // 256)


class TritonPermuteOps:
    @staticmethod
    def gather_sum(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None,
                   limit: torch.Tensor | None = None) -> torch.Tensor:
        """src [R, d], rows [N, k] (int64 rows of src), weights [N, k] or None (all ones), limit
        [1] or None (rows from it on count as zero) -> [N, d]."""
        src = src.contiguous()
        num, top_k = rows.shape
        out = src.new_empty(num, src.size(1))
        if num == 0:
            return out  # a CUDA grid has no zero dimension
        block, warps = row_block(src.size(1))
        _gather_sum_kernel[(num, triton.cdiv(src.size(1), block))](
            src, rows.contiguous(), weights.contiguous() if weights is not None else src,
            limit if limit is not None else rows, out, src.size(1), src.stride(0), out.stride(0),
            TOP_K=top_k, HAS_WEIGHTS=weights is not None, HAS_LIMIT=limit is not None,
            BLOCK_D=block, num_warps=warps)
        return out

    @staticmethod
    def scale_rows(src: torch.Tensor, frames: torch.Tensor, weights: torch.Tensor,
                   y: torch.Tensor | None, limit: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """src [N, d], frames / weights [R] -> (out [R, d], dot [R] fp32 or None without y, zero
        from row `limit` on)."""
        src = src.contiguous()
        rows = frames.numel()
        out = src.new_empty(rows, src.size(1))
        dot = torch.empty(rows, device=src.device, dtype=torch.float32) if y is not None else None
        if rows == 0:
            return out, dot
        y = y.contiguous() if y is not None else None
        block, warps = row_block(src.size(1))
        _scale_rows_kernel[(rows,)](
            src, frames.contiguous(), weights.contiguous(), y if y is not None else src,
            limit if limit is not None else frames, out, dot if dot is not None else out,
            src.size(1), src.stride(0), (y if y is not None else src).stride(0), out.stride(0),
            HAS_DOT=y is not None, HAS_LIMIT=limit is not None, BLOCK_D=block, num_warps=warps)
        return out, dot

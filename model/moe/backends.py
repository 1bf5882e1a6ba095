"""Compute backends for the experts' grouped linear layers, and the rule that picks one.

A grouped linear layer computes y[rows of e] = x[rows of e] @ w[e] + b[e] for the contiguous row
groups of a permuted batch. Three implementations, equal up to rounding:

- `reference`: one addmm per expert. Reads the group sizes on the host; the CPU choice.
- `grouped_mm`: `torch._grouped_mm` (CUTLASS grouped GEMM), fast on sm90+ in bf16.
- `triton`: our grouped GEMM (`triton_grouped_gemm`), for sm80/86/89, where `_grouped_mm`
  falls back to a per-expert loop with host syncs.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal

import torch

Backend = Literal["reference", "grouped_mm", "triton"]
# "export" is not a grouped linear layer: it makes `MoEFeedForward` take the static-graph path
# below (every expert on every frame, top-k picked after), used for TorchScript and ONNX export.
BACKEND_CHOICES = ("auto", "reference", "grouped_mm", "triton", "export")


@dataclass
class ExpertGroups:
    """Where each expert's rows sit in a permuted batch of `num_rows` rows."""

    counts: torch.Tensor  # [E] int64, rows per expert, on the batch's device
    num_rows: int

    @cached_property
    def offsets(self) -> torch.Tensor:
        """[E] int32 group ends, the `offs` of `torch._grouped_mm` and of the Triton kernels."""
        return self.counts.cumsum(0).to(torch.int32)

    @cached_property
    def sizes(self) -> list[int]:
        return self.counts.tolist()  # a host sync on GPU: only the reference backend asks

    @cached_property
    def row_expert(self) -> torch.Tensor:
        # output_size keeps repeat_interleave from reading the total back to the host.
        experts = torch.arange(self.counts.numel(), device=self.counts.device)
        return torch.repeat_interleave(experts, self.counts, output_size=self.num_rows)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
               groups: ExpertGroups) -> torch.Tensor:
    parts = [torch.addmm(b[e], xe, w[e]) for e, xe in enumerate(torch.split(x, groups.sizes))]
    return torch.cat(parts)


def _weight_grads(x: torch.Tensor, grad: torch.Tensor, groups: ExpertGroups, w: torch.Tensor,
                  b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dw[e] = x_e^T grad_e and db[e] = sum of grad_e rows: K-grouped products, groups along
    the reduction dimension."""
    grad_w = torch._grouped_mm(x.t(), grad, offs=groups.offsets)
    # The bias gradient is the same product with x = ones; an [8, M] ones matrix is the narrowest
    # left operand whose strides meet _grouped_mm's 16-byte alignment rule.
    ones = grad.new_ones(grad.size(0), 8).t()
    grad_b = torch._grouped_mm(ones, grad, offs=groups.offsets)[:, 0]
    return grad_w.to(w.dtype), grad_b.to(b.dtype)


class _GroupedMMLinear(torch.autograd.Function):
    """CUTLASS grouped GEMM for the forward and the input gradient (`torch._grouped_mm`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                groups: ExpertGroups) -> torch.Tensor:
        ctx.save_for_backward(x, w, b)
        ctx.groups = groups
        y = torch._grouped_mm(x, w.to(x.dtype), offs=groups.offsets)
        return y.add_(b.to(y.dtype).index_select(0, groups.row_expert))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, b = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, w.to(grad.dtype).transpose(1, 2), offs=ctx.groups.offsets)
        grad_w, grad_b = _weight_grads(x, grad, ctx.groups, w, b)
        return grad_x, grad_w, grad_b, None


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                groups: ExpertGroups) -> torch.Tensor:
    return _GroupedMMLinear.apply(x.contiguous(), w, b, groups)


def _triton(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
            groups: ExpertGroups) -> torch.Tensor:
    from u2moe.model.moe.triton_grouped_gemm import TritonGroupedLinear

    return TritonGroupedLinear.apply(x, w, b, groups.offsets)


def all_experts_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The export path's linear layer: y[e] = x @ w[e] + b[e] for every expert e.

    x [N, K] (the same rows for every expert) or [E, N, K] -> [E, N, out]. No group sizes, no
    host reads, no data-dependent shapes: TorchScript and ONNX take it as it is. It computes E/k
    times the reference's FLOPs but reads each expert's weights once, which is what bounds
    small-batch CPU inference (docs/moe.md).
    """
    return torch.matmul(x, w) + b.unsqueeze(1)


def combine_top_k(y: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The export path's combine: y [E, N, d] of every expert -> [N, d], each frame's k chosen
    experts' rows weighted and summed in slot order (the same sum as `SortedTokenDispatcher.combine`)."""
    num_rows, dim = y.size(1), y.size(2)
    frame = torch.arange(num_rows, device=y.device).unsqueeze(1)
    picked = y.reshape(-1, dim).index_select(0, (expert_ids * num_rows + frame).reshape(-1))
    picked = picked.view(num_rows, expert_ids.size(1), dim)
    return (picked * weights.to(picked.dtype).unsqueeze(2)).sum(dim=1)


GROUPED_LINEAR: dict[str, Callable[..., torch.Tensor]] = {
    "reference": _reference, "grouped_mm": _grouped_mm, "triton": _triton}


def backend_override() -> str:
    """The backend asked for through U2MOE_EXPERT_BACKEND ("auto" when unset)."""
    name = os.environ.get("U2MOE_EXPERT_BACKEND", "auto")
    if name not in BACKEND_CHOICES:
        raise ValueError(f"U2MOE_EXPERT_BACKEND={name!r} is not one of {BACKEND_CHOICES}")
    return name


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def select_backend(requested: str, device: torch.device, dtype: torch.dtype,
                   dims: tuple[int, ...]) -> Backend:
    """`requested` unless it is "auto"; then the fastest backend known to work here."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "reference"
    major, _ = torch.cuda.get_device_capability(device)
    # _grouped_mm needs 16-byte aligned row strides: multiples of 8 bf16 elements.
    if major >= 9 and dtype == torch.bfloat16 and all(d % 8 == 0 for d in dims):
        return "grouped_mm"
    if major >= 8 and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "reference"

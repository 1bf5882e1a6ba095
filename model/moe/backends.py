"""Compute backends for the experts' grouped linear layers, and the rule that picks one.

A grouped linear layer computes y[rows of e] = x[rows of e] @ w[e] + b[e] for the contiguous row
groups of a permuted batch; a backend provides it and its two gradients (`GroupedGemm`). Three
implementations, equal up to rounding:

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
from typing import Literal

import torch

from .triton_bias import TritonBiasOps
from .triton_grouped_gemm import grouped_rows, weight_grad

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_kernels_for(x: torch.Tensor) -> bool:
    """Whether ops on x take our single-pass Triton kernels (the dispatcher's, the router's, the
    bias ops'): on CUDA where Triton is installed; PyTorch's ops otherwise."""
    return x.is_cuda and HAS_TRITON

Backend = Literal["reference", "grouped_mm", "triton"]
# "export" is not a grouped linear layer: it makes `MoEFeedForward` take its exporters' inference
# path (GroupedExperts.forward_sparse), the one TorchScript and ONNX export.
BACKEND_CHOICES = ("auto", "reference", "grouped_mm", "triton", "export")


@dataclass
class ExpertGroups:
    """Where each expert's rows sit in a permuted batch: rows come expert by expert. Rows past
    the last group (from offsets[-1] on) are unrouted: no expert computes them, and a backend
    leaves their outputs unspecified (`torch._grouped_mm` does not write them)."""

    offsets: torch.Tensor  # [E] int32 group ends, the `offs` of `torch._grouped_mm` and of the Triton kernels
    row_expert: torch.Tensor  # [M] int64 expert of each row, ascending; E for unrouted rows

    @classmethod
    def from_sorted(cls, row_expert: torch.Tensor, num_experts: int) -> ExpertGroups:
        """Groups of rows whose experts `row_expert` are sorted (id num_experts: unrouted, last):
        the ends come from a binary search, without counting passes or host reads."""
        experts = torch.arange(num_experts, device=row_expert.device, dtype=row_expert.dtype)
        return cls(torch.searchsorted(row_expert, experts, right=True, out_int32=True), row_expert)

    @cached_property
    def counts(self) -> torch.Tensor:
        """[E] int64 rows per expert."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1)).long()

    @cached_property
    def sizes(self) -> list[int]:
        return self.counts.tolist()  # a host sync on GPU: only the reference backend asks

    @cached_property
    def num_routed(self) -> int:
        return sum(self.sizes)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each group's block of rows [M, ...], unrouted rows left out (host sizes)."""
        return torch.split(rows[:self.num_routed], self.sizes)


class GroupedGemm:
    """The three grouped products of a grouped linear layer y[rows of e] = x[rows of e] @ w[e] + b[e],
    all operands in one dtype. `ExpertFFN` (experts.py) chains them into the experts' forward and
    backward; each backend below implements them with its own kernels."""

    # True where the products need the group sizes on the host: a device-host sync per layer,
    # which a CUDA graph cannot hold.
    reads_host = False

    @staticmethod
    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: ExpertGroups
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K], w [E, K, N], b [E, N] -> (y [M, N], the input `param_grads` wants back: x,
        or a copy of x that the backend widened to fold the bias in)."""
        raise NotImplementedError

    @staticmethod
    def input_grad(grad: torch.Tensor, w: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """grad [M, N] -> [M, K]: grad[rows of e] @ w[e]^T."""
        raise NotImplementedError

    @staticmethod
    def param_grads(x: torch.Tensor, grad: torch.Tensor, groups: ExpertGroups, in_features: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dw [E, K, N], db [E, N]): x[rows of e]^T @ grad[rows of e] and the sum of grad[rows of e];
        x is what `linear` returned beside y, K = in_features its width before any widening."""
        raise NotImplementedError


class ReferenceGemm(GroupedGemm):
    """One matrix product per expert; reads the group sizes on the host. The CPU's choice."""

    reads_host = True

    @staticmethod
    def linear(x, w, b, groups):
        y = _cat_groups([torch.addmm(b[e], xe, w[e]) for e, xe in enumerate(groups.split(x))], x.size(0))
        return y, x

    @staticmethod
    def input_grad(grad, w, groups):
        return _cat_groups([ge @ w[e].t() for e, ge in enumerate(groups.split(grad))], grad.size(0))

    @staticmethod
    def param_grads(x, grad, groups, in_features):
        dw, db = zip(*((xe.t() @ ge, ge.sum(0)) for xe, ge in zip(groups.split(x), groups.split(grad))))
        return torch.stack(dw), torch.stack(db)


def _cat_groups(blocks: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The groups' output blocks as one [rows, N]; unrouted rows (after the groups) zero."""
    y = torch.cat(blocks)
    return y if y.size(0) == rows else torch.cat([y, y.new_zeros(rows - y.size(0), y.size(1))])


class TorchBiasOps:
    """The `grouped_mm` backend's bias folds and bias add, in PyTorch: the CPU path, and the
    reference of the single-pass Triton kernels (`triton_bias.TritonBiasOps`) used on CUDA."""

    @staticmethod
    def widen_rows(x: torch.Tensor, columns: int) -> torch.Tensor:
        """x [M, K] -> [M, K + columns]: x, then columns of ones."""
        wide = x.new_empty(x.size(0), x.size(1) + columns)
        wide[:, :x.size(1)] = x
        wide[:, x.size(1):] = 1
        return wide

    @staticmethod
    def widen_weight(w: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
        """w [E, K, N], b [E, N] -> [E, K + rows, N]: w, the bias as row K, then zero rows."""
        pad = b.new_zeros(1, 1, 1).expand(w.size(0), rows - 1, w.size(2))
        return torch.cat([w, b.unsqueeze(1), pad], dim=1)

    @staticmethod
    def add_group_bias_(y: torch.Tensor, b: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        """y [M, N] += b[row_expert] (b [E, N]; unrouted rows, expert E, get none), in place;
        returns y."""
        return y.add_(torch.cat([b, b.new_zeros(1, b.size(1))]).index_select(0, row_expert))


def bias_ops(x: torch.Tensor) -> type:
    """`triton_bias.TritonBiasOps` where `triton_kernels_for(x)`, `TorchBiasOps` otherwise."""
    if triton_kernels_for(x):
        return TritonBiasOps
    return TorchBiasOps


class GroupedMMGemm(GroupedGemm):
    """CUTLASS grouped GEMM (`torch._grouped_mm`); the bias multiplied in as an extra row of the
    weights, or added to each row from its expert (`bias_ops`)."""

    # Width of the ones block appended to x to multiply the bias in: _grouped_mm wants 16-byte
    # aligned row strides, 8 bf16 elements.
    BIAS_COLUMNS = 8

    @staticmethod
    def linear(x, w, b, groups):
        ops = bias_ops(x)
        if x.size(1) < 2 * w.size(2):
            # Widening x by 8 columns of ones (one pass over [M, K]) and w by the bias and 7
            # zero rows costs less than adding a bias row to each output row (one pass over
            # [M, N]; three in PyTorch) where N is the larger: the experts' first layer (K = d,
            # N = 4d). The widened x is kept for the backward, whose weight-gradient product then
            # yields the bias gradient as its row K (no separate pass over the [M, N] gradient).
            wide = ops.widen_rows(x, GroupedMMGemm.BIAS_COLUMNS)
            wide_w = ops.widen_weight(w, b, GroupedMMGemm.BIAS_COLUMNS)
            return torch._grouped_mm(wide, wide_w, offs=groups.offsets), wide
        return ops.add_group_bias_(torch._grouped_mm(x, w, offs=groups.offsets), b, groups.row_expert), x

    @staticmethod
    def input_grad(grad, w, groups):
        return torch._grouped_mm(grad, w.transpose(1, 2), offs=groups.offsets)

    @staticmethod
    def param_grads(x, grad, groups, in_features):
        # Groups along the reduction dimension (K-grouped products).
        dw = torch._grouped_mm(x.t(), grad, offs=groups.offsets)
        if x.size(1) > in_features:  # linear's widened x: rows K.. of dw are each the bias gradient
            return dw[:, :in_features].contiguous(), dw[:, in_features].contiguous()
        # The bias gradient is the same product with x = ones; an [8, M] ones matrix is the
        # narrowest left operand whose strides meet _grouped_mm's 16-byte alignment rule.
        ones = grad.new_ones(grad.size(0), 8).t()
        return dw, torch._grouped_mm(ones, grad, offs=groups.offsets)[:, 0]


class TritonGemm(GroupedGemm):
    """Our Triton kernels (`triton_grouped_gemm`), bias fused into the row kernel and the bias
    gradient into the weight-gradient kernel."""

    @staticmethod
    def linear(x, w, b, groups):
        return grouped_rows(x, w, b, groups.offsets, transpose_w=False), x

    @staticmethod
    def input_grad(grad, w, groups):
        return grouped_rows(grad, w, None, groups.offsets, transpose_w=True)

    @staticmethod
    def param_grads(x, grad, groups, in_features):
        return weight_grad(x, grad, groups.offsets)


GEMMS: dict[str, type[GroupedGemm]] = {
    "reference": ReferenceGemm, "grouped_mm": GroupedMMGemm, "triton": TritonGemm}


def backend_override() -> str:
    """The backend asked for through U2MOE_EXPERT_BACKEND ("auto" when unset)."""
    name = os.environ.get("U2MOE_EXPERT_BACKEND", "auto")
    if name not in BACKEND_CHOICES:
        raise ValueError(f"U2MOE_EXPERT_BACKEND={name!r} is not one of {BACKEND_CHOICES}")
    return name


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
    if major >= 8 and HAS_TRITON:
        return "triton"
    return "reference"

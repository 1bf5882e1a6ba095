"""The experts: E feed-forward networks stored as stacked weight tensors.

Stacked [E, ...] weights are what a grouped matrix multiply consumes, and what expert parallelism
slices: a rank holding experts [e0, e1) holds rows [e0, e1) of every tensor.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..activation import ACTIVATIONS
from ..autocast import compute_dtype
from ..packed_linear import PackedWeights, packed_linear, packing_applies
from .backends import GEMMS, ExpertGroups, GroupedGemm, backend_override, select_backend

# Each activation as a function, and its backward from its input as autograd computes it.
_ACTIVATION_FNS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor],
                              Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "relu": (F.relu, lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0)),
    "swish": (F.silu, lambda grad, h: torch.ops.aten.silu_backward(grad, h)),
    "gelu": (F.gelu, lambda grad, h: torch.ops.aten.gelu_backward(grad, h)),
}


class ExpertFFN(torch.autograd.Function):
    """linear -> activation -> dropout -> linear over grouped rows, as one autograd node.

    Autograd would record about a dozen nodes here (casts, bias gathers, the activation, the
    dropout mask); on a GPU their host overhead, not their kernels, would bound the MoE layer.
    The backward is written out: two grouped products per linear layer and the activation's and
    dropout's own backward kernels.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor, groups: ExpertGroups, gemm: type[GroupedGemm], activation: str,
                dropout: float, dtype: torch.dtype) -> torch.Tensor:
        h, x_saved = gemm.linear(x.to(dtype).contiguous(), w1.to(dtype), b1.to(dtype), groups)
        a = _ACTIVATION_FNS[activation][0](h)
        mask = None
        if dropout > 0:
            a, mask = torch.native_dropout(a, dropout, True)
        y, a_saved = gemm.linear(a, w2.to(dtype), b2.to(dtype), groups)
        # The fp32 weights, not their casts: saving the casts would hold a second copy of every
        # expert for the backward, in a MoE model most of its parameters.
        ctx.save_for_backward(x_saved, h, a_saved, mask, w1, w2)
        ctx.groups, ctx.gemm, ctx.activation, ctx.dropout = groups, gemm, activation, dropout
        ctx.dtypes = (x.dtype, b1.dtype, b2.dtype)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, h, a, mask, w1, w2 = ctx.saved_tensors
        groups, gemm = ctx.groups, ctx.gemm
        grad = grad.to(a.dtype).contiguous()
        grad_w2, grad_b2 = gemm.param_grads(a, grad, groups, w2.size(1))
        grad_a = gemm.input_grad(grad, w2.to(h.dtype), groups)
        if mask is not None:
            grad_a = torch.ops.aten.native_dropout_backward(grad_a, mask, 1.0 / (1.0 - ctx.dropout))
        grad_h = _ACTIVATION_FNS[ctx.activation][1](grad_a, h)
        grad_w1, grad_b1 = gemm.param_grads(x, grad_h, groups, w1.size(1))
        grad_x = gemm.input_grad(grad_h, w1.to(h.dtype), groups) if ctx.needs_input_grad[0] else None
        x_dtype, b1_dtype, b2_dtype = ctx.dtypes
        return (None if grad_x is None else grad_x.to(x_dtype), grad_w1.to(w1.dtype),
                grad_b1.to(b1_dtype), grad_w2.to(w2.dtype), grad_b2.to(b2_dtype),
                None, None, None, None, None)


class GroupedExperts(nn.Module):
    # Decoding's packed copies of the weights (packed_linear): derived, never saved or scripted.
    __jit_ignored_attributes__ = ["packed"]

    def __init__(self, num_experts: int, dim: int, hidden_units: int, activation: str,
                 dropout_rate: float):
        super().__init__()
        self.num_experts = num_experts
        # "auto" or a name from backends.GEMMS, resolved per call (device, dtype), or
        # "export" (MoEFeedForward then takes its exporters' inference path, forward_sparse);
        # settable per layer, or for a whole run through U2MOE_EXPERT_BACKEND.
        self.backend = backend_override()
        self.activation_name = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_units))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_units))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_units, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout_rate)
        self.packed = PackedWeights()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert starts like an nn.Linear pair: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(weight.size(1))
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def shard(self, first: int, count: int) -> None:
        """Keep only experts [first, first + count): this rank's slice under expert parallelism."""
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, nn.Parameter(getattr(self, name).detach()[first:first + count].clone()))
        self.num_experts = count

    @torch.jit.unused  # group sizes are host values: TorchScript and ONNX use forward_sparse
    def forward(self, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """x [M, dim] grouped by expert (`groups`) -> [M, dim]."""
        dtype = compute_dtype(x)
        backend = select_backend(self.backend, x.device, dtype, tuple(self.w1.shape[1:]))
        if x.size(0) == 0:
            backend = "reference"  # nothing to compute: its per-expert loop runs no kernel on zero rows
        dropout = self.dropout.p if self.training else 0.0
        return ExpertFFN.apply(x, self.w1, self.b1, self.w2, self.b2, groups, GEMMS[backend],
                               self.activation_name, dropout, dtype)

    def decodes_packed(self, x: torch.Tensor) -> bool:
        """Whether x takes `forward_packed`: decoding on a CPU (`packing_applies`) with the backend
        left to "auto"."""
        return self.backend == "auto" and packing_applies(self, x, compute_dtype(x))

    def forward_packed(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding on a CPU: x [N, dim] unpermuted, expert_ids / weights [N, k] from the router
        -> [N, dim]. The (frame, slot) pairs grouped by expert with one stable sort, each expert's
        two products on its packed weights (`packed_linear`), experts with no pairs skipped (their
        weights are not read), the weighted outputs summed back onto their frames. Few ops: at
        batch 1 the layer's fixed cost is a sizeable part of its time."""
        dtype = compute_dtype(x)
        packed = self.packed.get((self.w1, self.w2), dtype,
                                 lambda: [w.t() for w in self.w1] + [w.t() for w in self.w2])
        b1, b2 = self.b1.to(dtype), self.b2.to(dtype)
        ids = expert_ids.reshape(-1)
        order = torch.sort(ids, stable=True).indices
        frames = torch.div(order, expert_ids.size(1), rounding_mode="floor")
        rows = x.to(dtype).index_select(0, frames)
        y = rows.new_empty(rows.shape)
        start = 0
        for e, count in enumerate(torch.bincount(ids, minlength=self.num_experts).tolist()):
            if count:
                h = self.activation(packed_linear(rows[start:start + count], packed[e], b1[e]))
                y[start:start + count] = packed_linear(h, packed[self.num_experts + e], b2[e])
            start += count
        y = y * weights.reshape(-1).index_select(0, order).to(dtype).unsqueeze(1)
        return y.new_zeros(x.size(0), y.size(1)).index_add_(0, frames, y)

    def forward_sparse(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
                       ) -> torch.Tensor:
        """Inference, scriptable: x [N, dim] unpermuted, expert_ids / weights [N, k] from the router
        -> [N, dim]. Each expert runs on its own (frame, slot) pairs, taken in the order the
        training path's stable sort gives them, and the k outputs of a frame are weighted and
        summed in slot order: the training path's arithmetic (the reference backend's products)
        without its autograd nodes."""
        pairs = x.new_zeros(expert_ids.size(0), expert_ids.size(1), x.size(1))
        # No branch on a group's size: torch.export (ONNX) cannot trace data-dependent control
        # flow, and an expert no frame chose multiplies zero rows.
        for e in range(self.num_experts):
            picked = (expert_ids == e).nonzero()  # (frame, slot) pairs, in frame order
            frames, slots = picked[:, 0], picked[:, 1]
            h = self.dropout(self.activation(torch.addmm(self.b1[e], x.index_select(0, frames), self.w1[e])))
            pairs.index_put_((frames, slots), torch.addmm(self.b2[e], h, self.w2[e]))
        return (pairs * weights.to(pairs.dtype).unsqueeze(2)).sum(dim=1)

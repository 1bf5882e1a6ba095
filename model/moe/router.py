"""Top-k router: which experts see each frame, and with what weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backends import triton_kernels_for
from .triton_router import TritonTopKSoftmax


@dataclass
class Routing:
    expert_ids: torch.Tensor  # [N, k] int64, the chosen experts of each frame; E for skipped frames
    weights: torch.Tensor  # [N, k] float32, softmax over the chosen logits only
    aux_loss: torch.Tensor | None  # weighted load-balancing loss, when enabled
    skip: torch.Tensor | None = None  # [N] bool, frames no expert computes (their ids are E)


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 counts of each expert id. Not torch.bincount: on CUDA it reads the id range
    back to the host (a stall per MoE layer), even with minlength. A compare-and-sum over
    [N, E] needs neither host reads nor atomics."""
    experts = torch.arange(num_experts, device=expert_ids.device)
    return (expert_ids.unsqueeze(1) == experts).sum(dim=0)


def torch_top_k_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (the top k experts [N, k], descending; the softmax over their logits).
    The CPU path, and the reference of `triton_router.TritonTopKSoftmax`."""
    top, expert_ids = logits.topk(top_k, dim=-1)
    return expert_ids, top.softmax(dim=-1)


def top_k_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch_top_k_softmax`, as one Triton kernel each way where `triton_kernels_for(logits)`."""
    if triton_kernels_for(logits):
        return TritonTopKSoftmax.apply(logits, top_k)
    return torch_top_k_softmax(logits, top_k)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits x [N, d] @ weight [E, d]^T. The frames and weight are cast to fp32, unless both
    are bf16 (ZeRO's bf16 training): then `_Bf16Logits`, the same logits without the fp32 copies."""
    if x.dtype == weight.dtype == torch.bfloat16:
        return _Bf16Logits.apply(x, weight)
    return F.linear(x.float(), weight.float())


class _Bf16Logits(torch.autograd.Function):
    """fp32 logits of bf16 frames and a bf16 weight: on CUDA one tensor-core product with fp32
    output. Products of bf16 numbers are exact in fp32, so these are the logits of fp32 copies of
    both, up to summation order, without writing an fp32 copy of the frames (and reading it
    again, saved, in the backward). The backward runs in bf16, like every bf16 layer's: the
    logits' gradient rounded to bf16, products accumulated in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        if x.is_cuda:
            return torch.mm(x, weight.t(), out_dtype=torch.float32)
        return torch.mm(x.float(), weight.float().t())  # no mm with an fp32 output on CPU

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = torch.mm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(grad.t(), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


class TopKRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int,
                 noise_std: float = 0.0, aux_loss_weight: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std
        self.aux_loss_weight = aux_loss_weight
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default

    @torch.jit.unused  # TorchScript and the exporters route through `select`
    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> Routing:
        """skip [N] (True: route nowhere, expert id E): padding kept in the batch for static
        shapes; it also stays out of the balancing loss."""
        # Routing decisions are made in fp32 whatever the training precision: in bf16, near-ties
        # between experts flip from step to step and from rank to rank.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = router_logits(x, self.weight)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        expert_ids, weights = top_k_softmax(logits, self.top_k)
        if skip is not None:
            expert_ids = expert_ids.masked_fill(skip.unsqueeze(1), self.num_experts)
        aux_loss = None
        if self.training and self.aux_loss_weight > 0 and x.size(0) > 0:
            aux_loss = self.aux_loss_weight * self._load_balancing_loss(logits, expert_ids, skip)
        return Routing(expert_ids=expert_ids, weights=weights, aux_loss=aux_loss, skip=skip)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference routing as `forward` does it in eval mode (no noise, no loss), scriptable:
        (expert_ids [N, k], weights [N, k] fp32). Used by the export path and CPU decoding
        (`MoEFeedForward`)."""
        return torch_top_k_softmax(F.linear(x.float(), self.weight.float()), self.top_k)

    def _load_balancing_loss(self, logits: torch.Tensor, expert_ids: torch.Tensor,
                             skip: torch.Tensor | None) -> torch.Tensor:
        """Switch-Transformer loss E * sum_i f_i * P_i over the routed frames; equals 1 when the
        load is uniform. Skipped frames' ids (E) match no expert."""
        probs = logits.softmax(dim=-1)
        if skip is None:
            probs, frames = probs.mean(dim=0), expert_ids.size(0)
        else:
            kept = (~skip).float()
            frames = kept.sum().clamp_min(1)  # a tensor: no host read
            probs = (probs * kept.unsqueeze(1)).sum(dim=0) / frames
        counts = count_per_expert(expert_ids.reshape(-1), self.num_experts)
        fraction = counts.float() / (frames * expert_ids.size(1))
        return self.num_experts * (fraction * probs).sum()

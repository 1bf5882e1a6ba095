"""Gradient clipping by global norm, done by the trainer when DeepSpeed runs without ZeRO.

Without ZeRO (stage 0, fp32 weights or `torch_autocast`), DeepSpeed clips with the average of
each rank's local norm. With expert parallelism the ranks hold different experts, so that average
is not the model's norm. Here the norm is exact: shared gradients are the same on every rank once
reduced, expert gradients differ across the expert-parallel group, so

    norm^2 = |shared|^2 + sum over the expert-parallel group of |local experts|^2.

Norms come from torch's multi-tensor kernels and clipping never reads the norm on the host: a
few kernels per step instead of several per parameter. A non-finite norm is not looked for here
(that would stall every step); the trainer refuses to checkpoint after one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GradClipper:
    def __init__(self, model: nn.Module, max_norm: float, expert_group: dist.ProcessGroup | None):
        params = [p for p in model.parameters() if p.requires_grad]
        # DeepSpeed's MoE marker (model/moe/parallel.py): expert parameters are not all-reduced
        # over the whole world.
        self.shared = [p for p in params if getattr(p, "allreduce", True)]
        self.experts = [p for p in params if not getattr(p, "allreduce", True)]
        self.max_norm = max_norm
        self.expert_group = expert_group if expert_group is not None and dist.get_world_size(expert_group) > 1 else None

    @staticmethod
    def _squared_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().square()

    def global_norm(self) -> torch.Tensor:
        device = next(p.device for p in self.shared + self.experts)
        expert_sq = self._squared_norm(self.experts, device)
        if self.expert_group is not None:
            dist.all_reduce(expert_sq, group=self.expert_group)
        return (self._squared_norm(self.shared, device) + expert_sq).sqrt()

    def __call__(self) -> torch.Tensor:
        """Clip every gradient in place; returns the norm before clipping (a device scalar)."""
        norm = self.global_norm()
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.shared + self.experts, self.max_norm, norm)
        return norm

"""AdamW over the model's parameters, grouped the way DeepSpeed's ZeRO expects for MoE."""
from __future__ import annotations

import torch

from ..configs.train import OptimConfig
from ..model.moe.parallel import moe_optimizer_param_groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Expert parameters get their own groups, tagged 'moe', so that ZeRO partitions and reduces
    # them over the expert-data-parallel group instead of the whole world.
    groups = moe_optimizer_param_groups(model, cfg.weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)

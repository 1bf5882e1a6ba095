"""The learning-rate schedules: linear warmup to `optim.lr`, then a decay.

inverse_sqrt is WeNet's WarmupLR, lr * warmup^0.5 * min(step^-0.5, step * warmup^-1.5): open
ended, for runs stopped by epochs or by hand. cosine falls from lr at the end of the warmup to
lr * final_lr_ratio at train.max_steps: a run of a known length ends at a low rate, which is
what a short fixed-step run (the demo) needs most. A LambdaLR either way, so that its state (the
step) travels in DeepSpeed checkpoints like any torch scheduler's.
"""
from __future__ import annotations

import math

import torch

from ..configs.train import OptimConfig


def warmup_lr_factor(step: int, warmup_steps: int) -> float:
    step = max(step, 1)
    return warmup_steps ** 0.5 * min(step ** -0.5, step * warmup_steps ** -1.5)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    step = max(step, 1)
    if step <= warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(cfg: OptimConfig, total_steps: int):
    """The factor of `cfg.lr` at a step (counted from 1)."""
    if cfg.schedule == "cosine":
        return lambda step: warmup_cosine_factor(step, cfg.warmup_steps, total_steps, cfg.final_lr_ratio)
    return lambda step: warmup_lr_factor(step, cfg.warmup_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    factor = lr_factor(cfg, total_steps)
    # LambdaLR evaluates the factor at step 0 on construction; step + 1 makes the first update
    # use the step-1 rate, as WeNet does.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step + 1))

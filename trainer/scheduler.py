"""WeNet's WarmupLR: lr * warmup^0.5 * min(step^-0.5, step * warmup^-1.5).

Linear warmup to `lr` at `warmup_steps`, then inverse-square-root decay. A LambdaLR, so that its
state (the step) travels in DeepSpeed checkpoints like any torch scheduler's.
"""
from __future__ import annotations

import torch


def warmup_lr_factor(step: int, warmup_steps: int) -> float:
    step = max(step, 1)
    return warmup_steps ** 0.5 * min(step ** -0.5, step * warmup_steps ** -1.5)


def warmup_lr(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR evaluates the factor at step 0 on construction; step + 1 makes the first update
    # use the step-1 rate, as WeNet does.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_lr_factor(step + 1, warmup_steps))

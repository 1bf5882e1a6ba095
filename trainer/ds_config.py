"""DeepSpeed JSON config: what it owns, what the experiment yaml owns, and no silent overlap.

The JSON owns the distributed-systems settings (ZeRO stage and buckets, bf16/fp16 and loss
scaling, communication). The yaml owns everything about the optimisation itself (optimizer,
learning-rate schedule, gradient clipping, accumulation), because those travel with the recipe.
A key of the second kind in the JSON is an error, never a silent second value.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from u2moe.dataconf import ConfigError
from u2moe.trainer.config import TrainConfig

# JSON key -> where it lives instead.
YAML_OWNED = {
    "optimizer": "optim.* (AdamW is built by the trainer)",
    "scheduler": "optim.warmup_steps (WarmupLR)",
    "gradient_clipping": "train.grad_clip",
    "gradient_accumulation_steps": "train.accum_grad",
    "train_batch_size": "data.batch.* (batches are dynamic; the trainer sets this)",
    "train_micro_batch_size_per_gpu": "data.batch.* (batches are dynamic; the trainer sets this)",
}


class DeepSpeedConfigError(ConfigError):
    pass


def load_ds_config(path: str | Path, train: TrainConfig, world_size: int) -> dict[str, Any]:
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeepSpeedConfigError(f"{path}: cannot read DeepSpeed JSON ({err})") from err
    for key, home in YAML_OWNED.items():
        if key in cfg:
            raise DeepSpeedConfigError(f"{path}: '{key}' is set in the experiment yaml as {home}; remove it here")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage {stage} is not supported (0, 1 or 2)")
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        raise DeepSpeedConfigError(f"{path}: fp16 and bf16 are both enabled")
    # One dynamic batch is one DeepSpeed micro-batch.
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = train.accum_grad
    cfg["train_batch_size"] = train.accum_grad * world_size
    cfg["gradient_clipping"] = train.grad_clip
    # Our AdamW is a plain torch optimizer handed to deepspeed.initialize.
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def precision(cfg: dict[str, Any]) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"

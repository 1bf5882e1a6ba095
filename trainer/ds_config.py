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

import torch

from ..configs.loading import ConfigError
from ..configs.train import TrainConfig

# JSON key -> where it lives instead.
YAML_OWNED = {
    "optimizer": "optim.* (AdamW is built by the trainer)",
    "scheduler": "optim.warmup_steps and optim.schedule",
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
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage {stage} is not supported (0, 1 or 2)")
    enabled = [k for k in ("fp16", "bf16", "torch_autocast") if cfg.get(k, {}).get("enabled")]
    if len(enabled) > 1:
        raise DeepSpeedConfigError(f"{path}: {' and '.join(enabled)} are all enabled; choose one")
    try:
        autocast_dtype(cfg)
    except KeyError as err:
        raise DeepSpeedConfigError(f"{path}: torch_autocast.dtype {err} is not bfloat16 or float16") from None
    if stage == 0 and precision(cfg) == "fp16":
        raise DeepSpeedConfigError(f"{path}: fp16 needs ZeRO-1/2 (its loss scaling lives there); without ZeRO "
                                   'use "bf16" or "torch_autocast": {"enabled": true, "dtype": "bfloat16"}')
    if trainer_runs_bf16(cfg) and world_size > 1:
        raise DeepSpeedConfigError(f"{path}: bf16 without ZeRO runs on one process (the trainer keeps the fp32 "
                                   f"master weights, trainer/compute_weights.py), not {world_size}: use ZeRO-1/2 "
                                   'with bf16, or "torch_autocast"')
    # One dynamic batch is one DeepSpeed micro-batch.
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = train.accum_grad
    cfg["train_batch_size"] = train.accum_grad * world_size
    # Without ZeRO the trainer clips (trainer/clipping.py: DeepSpeed's stage-0 norm is wrong
    # under expert parallelism); with ZeRO, DeepSpeed does.
    cfg["gradient_clipping"] = train.grad_clip if stage else 0.0
    # Our AdamW is a plain torch optimizer handed to deepspeed.initialize.
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    return cfg.get("zero_optimization", {}).get("stage", 0)


def trainer_runs_bf16(cfg: dict[str, Any]) -> bool:
    """bf16 without ZeRO: the trainer runs DeepSpeed's bf16 arithmetic itself (a bf16 model on
    fp32 master weights, trainer/compute_weights.py), where DeepSpeed's own bf16 optimizer would
    check and copy every parameter separately; DeepSpeed's engine gets `engine_config`."""
    return zero_stage(cfg) == 0 and precision(cfg) == "bf16"


def engine_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config handed to deepspeed.initialize: an fp32 engine where the trainer runs bf16."""
    return {k: v for k, v in cfg.items() if k != "bf16"} if trainer_runs_bf16(cfg) else cfg


def trainer_clips(cfg: dict[str, Any]) -> bool:
    """Whether the trainer, not DeepSpeed, clips gradients (no ZeRO: see load_ds_config)."""
    return zero_stage(cfg) == 0


def offloads_to_host(cfg: dict[str, Any]) -> bool:
    """Whether ZeRO keeps optimizer state or parameters off the GPU (its optimizer step then
    runs on the host's cores)."""
    zero = cfg.get("zero_optimization", {})
    # `cpu_offload` / `cpu_offload_param`: DeepSpeed's deprecated spellings of the two offloads to the CPU.
    return bool(zero.get("cpu_offload") or zero.get("cpu_offload_param")) or any(
        zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))


def autocast_dtype(cfg: dict[str, Any]) -> torch.dtype | None:
    """The dtype of DeepSpeed's `torch_autocast` mode (fp32 weights and optimizer, matmuls in
    bf16/fp16 under torch.autocast), None when it is off."""
    section = cfg.get("torch_autocast", {})
    if not section.get("enabled"):
        return None
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16}[section.get("dtype", "bfloat16")]


def precision(cfg: dict[str, Any]) -> str:
    """The dtype of the model's weights (and of the inputs the trainer hands it)."""
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"

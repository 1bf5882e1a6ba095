"""The DeepSpeed engine and the speed modes around it, decided in one place.

`refuse_incompatible` is every start-up refusal of a combination of settings (checked before a
model is built); `build_engine` turns a model into what the training step runs: the engine,
and where they apply, the trainer's bf16 compute weights, the CUDA graphs of the layer stacks,
torch.compile of each layer, the trainer's gradient clipping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..configs.experiment import ExperimentConfig
from ..configs.loading import ConfigError
from ..model.asr_model import U2Model
from ..model.moe.parallel import enable_expert_parallel
from .clipping import GradClipper
from .compute_weights import Bf16ComputeWeights
from .cuda_graphs import GraphedLayers
from .cuda_graphs import install as install_cuda_graphs
from .cuda_graphs import refuse_unsupported as refuse_cuda_graphs
from .distributed import DistInfo, limit_host_threads
from .ds_config import autocast_dtype, engine_config, offloads_to_host, precision, trainer_clips, trainer_runs_bf16
from .optim import build_optimizer
from .scheduler import build_scheduler

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainingEngine:
    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any
    dtype: torch.dtype  # of the weights and of the inputs the trainer hands the model
    autocast: torch.dtype | None  # DeepSpeed applies it in training; evaluation does too
    compute_weights: Bf16ComputeWeights | None = None
    clipper: GradClipper | None = None
    graphed_layers: list[GraphedLayers] = field(default_factory=list)


def refuse_incompatible(cfg: ExperimentConfig, ds_cfg: dict[str, Any], ds_path: str, info: DistInfo) -> None:
    """A ConfigError for a combination of settings the trainer cannot run, before anything is built."""
    if cfg.train.compile and trainer_runs_bf16(ds_cfg):
        raise ConfigError(f"train.compile: not with bf16 without ZeRO ({ds_path}), whose forward swaps in "
                          "bf16 weights every step; use torch_autocast")
    if cfg.train.cuda_graphs:
        refuse_cuda_graphs(cfg, ds_cfg, ds_path, info)
    ep = cfg.train.expert_parallel_size
    moe_parts = [part for part in ("encoder", "decoder") if getattr(cfg.model, part).ffn.type == "moe"]
    for part in moe_parts:
        ffn = getattr(cfg.model, part).ffn
        if ffn.num_experts % ep:
            raise ConfigError(f"train.expert_parallel_size={ep} does not divide model.{part}.ffn.num_experts="
                              f"{ffn.num_experts}: each rank holds the same number of experts")
    if cfg.optim.schedule == "cosine" and not cfg.train.max_steps:
        raise ConfigError("optim.schedule=cosine decays to train.max_steps: set it (or --max-steps)")
    if moe_parts and info.world_size % ep:
        raise ConfigError(f"train.expert_parallel_size={ep} does not divide the world size {info.world_size}")


def build_engine(model: U2Model, cfg: ExperimentConfig, ds_cfg: dict[str, Any], info: DistInfo) -> TrainingEngine:
    """The model (fp32, on the host, warm-started if asked) made ready to train on `info.device`."""
    import deepspeed
    from deepspeed.utils import groups

    if not offloads_to_host(ds_cfg):  # an offloaded optimizer step needs the host's threads
        limit_host_threads(info.device, cfg.train.host_threads)
    expert_group = None
    if model.moe_layers():
        # After any warm start: the full model's experts are sliced for this rank here, so a
        # model.pt from any expert-parallel size starts any other.
        expert_group = groups._get_expert_parallel_group(
            enable_expert_parallel(model, cfg.train.expert_parallel_size))
    # On the device before the optimizer is built: torch's fused AdamW (one kernel for all
    # parameters) needs device parameters; ZeRO replaces them with its own flat partitions.
    model.to(info.device)
    if cfg.train.compile:
        for layer in [*model.encoder.encoders, *model.decoder.layers()]:
            layer.compile(dynamic=True)  # in place: parameter names, checkpoints unchanged
    optimizer = build_optimizer(model, cfg.optim)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg.optim, cfg.train.max_steps),
        config=engine_config(ds_cfg))
    one_plain_process = info.world_size == 1 and not engine.zero_optimization()
    if one_plain_process:
        # Nothing to reduce, yet DeepSpeed would flatten every gradient into a bucket,
        # "all-reduce" it and copy it back: one copy per parameter and step, a large share of a
        # host-bound step's launches.
        engine.enable_backward_allreduce = False
    built = TrainingEngine(engine, scheduler, DTYPES[precision(ds_cfg)], autocast_dtype(ds_cfg))
    # Persistent bf16 copies of the weights (trainer/compute_weights.py): those autocast would
    # cast every step, or all of them where the trainer runs DeepSpeed's bf16 mode itself
    # (load_ds_config allows that for one process only).
    if trainer_runs_bf16(ds_cfg):
        built.compute_weights = Bf16ComputeWeights(model, whole_model=True)
    elif one_plain_process and not cfg.train.compile and built.autocast == torch.bfloat16:
        built.compute_weights = Bf16ComputeWeights(model)
    # After the compute weights: the graphs are captured on the tensors the forward will hold.
    if cfg.train.cuda_graphs:
        built.graphed_layers = install_cuda_graphs(model, cfg.train.cuda_graph_shapes)
    if trainer_clips(ds_cfg):
        built.clipper = GradClipper(model, cfg.train.grad_clip, expert_group)
    return built

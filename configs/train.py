"""The `optim:` and `train:` sections of an experiment yaml."""
from __future__ import annotations

from dataclasses import dataclass

from .loading import ConfigError

SCHEDULES = ("inverse_sqrt", "cosine")


@dataclass
class OptimConfig:
    """AdamW, linear warmup to `lr`, then a decay (trainer/scheduler.py)."""

    lr: float = 1.0e-3
    weight_decay: float = 1.0e-6
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1.0e-8
    warmup_steps: int = 25000
    # inverse_sqrt: WeNet's WarmupLR, open-ended (lr / sqrt(step / warmup)). cosine: to
    # lr * final_lr_ratio at train.max_steps, for a run of a known length (it needs max_steps).
    schedule: str = "inverse_sqrt"
    final_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError("optim needs lr > 0, weight_decay >= 0, eps > 0")
        if self.warmup_steps < 1:
            raise ConfigError("optim.warmup_steps must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule: '{self.schedule}' is none of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ConfigError("optim.final_lr_ratio must be in [0, 1]")


@dataclass
class TrainConfig:
    max_epochs: int = 100
    # 0: no limit; the run stops at whichever of max_epochs / max_steps comes first.
    max_steps: int = 0
    grad_clip: float = 5.0
    accum_grad: int = 1
    # Experts are split over this many ranks; the world size must be a multiple of it.
    expert_parallel_size: int = 1
    seed: int = 777
    num_workers: int = 2
    prefetch_factor: int = 4
    log_interval: int = 100
    # Steps between dev evaluations and checkpoints (0: only at epoch end).
    eval_interval: int = 0
    save_interval: int = 0
    # False: checkpoints only every save_interval steps and when training stops (a 1B model's
    # checkpoint is ~16 GB: too much to write at every epoch end of a small corpus).
    epoch_checkpoints: bool = True
    keep_checkpoints: int = 5
    # Dev batches to evaluate (0: the whole dev set).
    max_eval_batches: int = 0
    # torch.compile each encoder and decoder layer (dynamic shapes: one compilation serves every
    # batch shape): fused element-wise kernels, fewer launches for a host-bound step. Costs about
    # a minute of compilation at the start.
    compile: bool = False
    # CPU threads of each training process's own tensor work when it trains on a GPU (0: torch's
    # default, one per core). The GPU does the math; the host only launches and runs small ops,
    # after which an OpenMP pool of one thread per core spin-waits (bench/omp_spin.py), taking
    # cores from the data workers and from other runs on the host. CPU training, and ZeRO
    # offloading to the host (whose optimizer step runs there), keep torch's default.
    host_threads: int = 1
    # CUDA graphs of the encoder's and decoders' layers, one per batch shape (trainer/cuda_graphs.py):
    # a host-bound step replays each stack's forward and backward in one launch. GPUs without
    # autocast (bf16 by ds_configs/zero0_pure_bf16.json on one, zero1/2_bf16.json on several; or
    # fp32), no expert parallelism, and fixed batch shapes (data.batch.type: bucket). Each stack
    # captures at most cuda_graph_shapes shapes (GPU memory: one set of activations per shape) and
    # runs any further shape eagerly.
    cuda_graphs: bool = False
    cuda_graph_shapes: int = 64
    # A rank that makes no progress (no step, evaluation batch or checkpoint) for this long ends
    # its process with a line naming the rank that stopped (trainer/watchdog.py): one stopped or
    # dead rank otherwise leaves the others waiting silently in a collective. It must exceed the
    # longest legitimate pause: a checkpoint write, the first step's compilation.
    watchdog_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.max_steps < 0:
            raise ConfigError("train needs max_epochs >= 1 and max_steps >= 0")
        if self.grad_clip <= 0 or self.accum_grad < 1 or self.expert_parallel_size < 1:
            raise ConfigError("train needs grad_clip > 0, accum_grad >= 1, expert_parallel_size >= 1")
        if self.num_workers < 0 or self.log_interval < 1 or self.keep_checkpoints < 1:
            raise ConfigError("train needs num_workers >= 0, log_interval >= 1, keep_checkpoints >= 1")
        if min(self.eval_interval, self.save_interval, self.max_eval_batches, self.host_threads) < 0:
            raise ConfigError("train intervals and host_threads must be >= 0")
        if self.cuda_graph_shapes < 1:
            raise ConfigError("train.cuda_graph_shapes must be >= 1")
        if self.watchdog_seconds <= 0:
            raise ConfigError("train.watchdog_seconds must be > 0")

"""`u2moe bench memory`: predicted GPU memory per card for a preset, a GPU count, expert
parallelism and a ZeRO stage, and the largest dynamic batch that fits.

Model states (exact, from the parameter count; checked against DeepSpeed's own allocations in
tests/test_memory_model.py). Per card, with S shared parameters, X expert parameters in all, N
GPUs, P-way expert parallelism (each card holds X/P expert parameters; their data-parallel group
has N/P cards, so ZeRO splits shared state N ways and expert state N/P ways, X/N per card):
- ZeRO-1/2 with DeepSpeed's bf16/fp16 engine: 2-byte weights; 2-byte gradients of the whole local
  model (ZeRO-1) or only a reduce bucket of them (ZeRO-2); the fp32 master weights, their fp32
  gradients and Adam's two moments (16 bytes) for this card's partition.
- no ZeRO with torch_autocast (`ds_configs/zero0_bf16.json`): fp32 weights, fp32 gradients and
  Adam's moments (16 bytes) for the whole local model, plus the bf16 copies autocast makes of
  the matmul weights (2 bytes); the same with `zero0_pure_bf16.json`, whose bf16 copies are of
  every weight (the matmul weights are nearly all of them).
Activations (measured): the bytes the forward pass keeps for backward, counted with
torch.autograd's saved-tensor hooks on this machine's CPU with bf16 weights. Some are kept once
per batch whatever its size (training's joint q/k/v projection saves the weights it joins, the
relative position encodings are the batch's): what a two-utterance batch keeps less than two
one-utterance batches. That and an utterance's share (what two keep beyond one) are each fitted
over three lengths as a + b T + c T^2 (attention is quadratic in T); a batch of F frames of
utterances of T frames holds F / T utterances and one batch's share. CPU attention keeps its softmax
probabilities, which GPU kernels recompute, so the quadratic term is an upper bound on a GPU's.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..configs.experiment import load_config
from ..configs.model import ModelConfig
from ..data_prep.progress_bar import progress_bar
from ..model import U2Model
from ..model.params import count_config_parameters

GiB = 2**30


@dataclass
class ModelStates:
    """Bytes per card for weights, gradients and optimizer state."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_states(shared: int, experts: int, gpus: int, ep: int, zero: int,
                 reduce_bucket: int = 200_000_000) -> ModelStates:
    """See the module docstring. zero 0 means torch_autocast without ZeRO; 1 and 2 the bf16 engine."""
    if gpus % ep or zero not in (0, 1, 2):
        raise ValueError(f"need ep dividing gpus and zero in 0/1/2 (gpus={gpus}, ep={ep}, zero={zero})")
    local = shared + experts / ep
    partition = shared / gpus + experts / gpus  # experts: X/P over N/P cards
    if zero == 0:
        return ModelStates(weights=4 * local + 2 * local, gradients=4 * local, optimizer=8 * local)
    grads = 2 * local if zero == 1 else 2 * min(reduce_bucket, local)
    return ModelStates(weights=2 * local, gradients=grads + 4 * partition, optimizer=12 * partition)


def _measurement_model(cfg: ModelConfig, checkpointing: bool) -> torch.nn.Module:
    from dataclasses import replace

    enc = replace(cfg.encoder, gradient_checkpointing=checkpointing, use_dynamic_chunk=False)
    dec = replace(cfg.decoder, gradient_checkpointing=checkpointing)
    # bf16 weights, as DeepSpeed's bf16 engine holds them (autocast would add weight copies,
    # which are per step, not per utterance).
    return U2Model(replace(cfg, encoder=enc, decoder=dec)).to(torch.bfloat16).train()


def _saved_bytes(model: torch.nn.Module, cfg: ModelConfig, input_frames: int, utterances: int = 1) -> int:
    tokens = max(2, input_frames // 40)  # about 2.5 tokens a second, BPE-like
    feats = torch.randn(utterances, input_frames, cfg.encoder.input_size, dtype=torch.bfloat16)
    target = torch.randint(1, cfg.vocab_size - 1, (utterances, tokens))
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        # Count each storage once: views of one tensor share it.
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(feats, torch.full((utterances,), input_frames), target, torch.full((utterances,), tokens))
    return sum(n for ptr, n in saved.items() if ptr not in params)


def measure_activations(cfg: ModelConfig, input_frames: int, checkpointing: bool = False,
                        utterances: int = 1) -> int:
    """Bytes saved for backward by one training forward of a batch of `utterances` utterances of
    `input_frames` frames each (CPU, bf16)."""
    return _saved_bytes(_measurement_model(cfg, checkpointing), cfg, input_frames, utterances)


@dataclass
class ActivationFit:
    """Bytes kept for backward, as quadratics in an utterance's input frames T: `per_step` once
    per batch (weights joined for one product, the relative position encodings of the batch's
    length), `per_utterance` for each utterance."""

    per_step: tuple[float, float, float]
    per_utterance: tuple[float, float, float]

    @staticmethod
    def _at(coeffs: tuple[float, float, float], frames: int) -> float:
        a, b, c = coeffs
        return a + b * frames + c * frames**2

    def step_bytes(self, utt_frames: int) -> float:
        return self._at(self.per_step, utt_frames)

    def utterance_bytes(self, utt_frames: int) -> float:
        return self._at(self.per_utterance, utt_frames)

    def batch_bytes(self, batch_frames: int, utt_frames: int) -> float:
        return self.step_bytes(utt_frames) + batch_frames / utt_frames * self.utterance_bytes(utt_frames)


def fit_activations(cfg: ModelConfig, lengths: tuple[int, int, int] = (300, 600, 1200),
                    checkpointing: bool = False) -> ActivationFit:
    """Batches of one and of two utterances at three lengths, on one model (building a 1B model is
    much of the cost): what two keep beyond one is an utterance's share, the rest the batch's."""
    # Minutes for the largest presets: the model build and each measurement advance the bar.
    with progress_bar(None, "bench memory", 1 + 2 * len(lengths), "step") as bar:
        model = _measurement_model(cfg, checkpointing)
        bar.update()
        saved = {}
        for utterances in (1, 2):
            for t in lengths:
                saved[utterances, t] = float(_saved_bytes(model, cfg, t, utterances=utterances))
                bar.update()
    ones, twos = [saved[1, t] for t in lengths], [saved[2, t] for t in lengths]
    vandermonde = torch.tensor([[1.0, t, t * t] for t in lengths], dtype=torch.float64)

    def fit(ys: list[float]) -> tuple[float, float, float]:
        coeffs = torch.linalg.solve(vandermonde, torch.tensor(ys, dtype=torch.float64))
        return tuple(float(c) for c in coeffs)  # type: ignore[return-value]

    return ActivationFit(per_step=fit([2 * o - t for o, t in zip(ones, twos)]),
                         per_utterance=fit([t - o for o, t in zip(ones, twos)]))


def plan(config: str, gpus: int, ep: int, zero: int, gpu_gb: float, utt_seconds: float,
         checkpointing: bool, reserve_gb: float) -> dict[str, Any]:
    cfg = load_config(config, []).model
    counts = count_config_parameters(cfg)
    states = model_states(counts["total"] - counts["experts"], counts["experts"], gpus, ep, zero)
    fit = fit_activations(cfg, checkpointing=checkpointing)
    utt = int(utt_seconds * 100)
    per_frame = fit.utterance_bytes(utt) / utt
    room = gpu_gb * GiB - states.total - reserve_gb * GiB - fit.step_bytes(utt)
    fits = max(0, math.floor(room / per_frame / 1000) * 1000) if room > 0 else 0
    return {"config": config, "gpus": gpus, "ep": ep, "zero": zero, "gpu_gb": gpu_gb,
            "parameters": counts["total"], "expert_parameters": counts["experts"],
            "model_states_gb": {k: v / GiB for k, v in asdict(states).items()} | {"total": states.total / GiB},
            "activation_fit_bytes": {"per_step": fit.per_step, "per_utterance": fit.per_utterance},
            "utterance_frames": utt, "activation_per_step_mb": fit.step_bytes(utt) / 2**20,
            "activation_mb_per_batch_frame": per_frame / 2**20,
            "gradient_checkpointing": checkpointing, "reserve_gb": reserve_gb,
            "max_batch_frames": fits}


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="predicted GPU memory per card and the largest batch that fits")
    p.add_argument("--config", default="moe_1b")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--ep", type=int, default=8, help="expert-parallel size")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2),
                   help="ZeRO stage (0: ds_configs/zero0_bf16.json; 1/2: the bf16 engine)")
    p.add_argument("--gpu-gb", type=float, default=24.0)
    p.add_argument("--utt-seconds", type=float, default=15.0, help="utterance length the batch is made of")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--reserve-gb", type=float, default=2.0,
                   help="CUDA context, allocator fragmentation, communication buffers")
    p.add_argument("--json", default=None)
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    result = plan(args.config, args.gpus, args.ep, args.zero, args.gpu_gb, args.utt_seconds,
                  args.gradient_checkpointing, args.reserve_gb)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return 0

"""The training loop: DeepSpeed engine, dynamic batches, lock-step ranks, eval, checkpoints."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from ..configs.experiment import ExperimentConfig
from ..configs.loading import ConfigError, to_dict
from ..data_prep import FeatureExtractor, Tokenizer, build_dataloader
from ..data_prep.errors import DataPrepError
from ..data_prep.features import num_frames
from ..inference.decoding.ctc_greedy import ctc_greedy_search
from ..inference.decoding.scoring import score
from ..inference.model_file import load_model_file
from ..model import U2Model
from ..model.cmvn import GlobalCMVN, load_cmvn
from ..model.flops import peak_tflops, training_flops
from .checkpoint import load_latest, save_checkpoint
from .distributed import DistInfo
from .ds_config import load_ds_config
from .engine import build_engine, refuse_incompatible
from .progress import BlankOutputWatch, Reporter, StepClock, ThroughputMeter, dev_line, format_duration, gpu_memory_gb
from .run_log import RunLog
from .watchdog import StepWatchdog

logger = logging.getLogger("u2moe.train")


@dataclass
class TrainPaths:
    train_shards: str
    dev_shards: str
    units: str
    cmvn: str
    exp_dir: Path
    ds_config: str
    init_model: str | None = None

    def check(self) -> None:
        """Refuse a missing input, naming it, before anything is written or built."""
        inputs = [("--train-shards", Path(self.train_shards)), ("--dev-shards", Path(self.dev_shards)),
                  ("--units", Path(self.units) / "units.txt"), ("--cmvn", Path(self.cmvn)),
                  ("--ds-config", Path(self.ds_config))]
        if self.init_model:
            inputs.append(("--init-model", Path(self.init_model)))
        for flag, path in inputs:
            if not path.is_file():
                raise ConfigError(f"{flag}: {path}: no such file")


def _reduce_flag(flag: bool, device: torch.device, op: Any) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag  # no device round trip (and host sync) when there is nobody to agree with
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=op)
    return bool(value.item())


def every_rank(flag: bool, device: torch.device) -> bool:
    """Ranks step in lock-step (gradient all-reduce, expert all-to-all): when the first rank's
    data ends, all ranks end the epoch together instead of waiting forever for it."""
    return _reduce_flag(flag, device, dist.ReduceOp.MIN)


def any_rank(flag: bool, device: torch.device) -> bool:
    return _reduce_flag(flag, device, dist.ReduceOp.MAX)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, paths: TrainPaths, info: DistInfo,
                 max_minutes: float | None = None):
        self.cfg, self.paths, self.info = cfg, paths, info
        self.max_minutes = max_minutes
        self.tokenizer = Tokenizer.load(paths.units)
        if self.tokenizer.vocab_size != cfg.model.vocab_size:
            raise ConfigError(f"{paths.units}: {self.tokenizer.vocab_size} units, but model.vocab_size is "
                              f"{cfg.model.vocab_size}; set --set model.vocab_size={self.tokenizer.vocab_size}")
        ds_cfg = load_ds_config(paths.ds_config, cfg.train, info.world_size)
        refuse_incompatible(cfg, ds_cfg, paths.ds_config, info)
        torch.manual_seed(cfg.train.seed)
        try:
            cmvn = GlobalCMVN(*load_cmvn(paths.cmvn))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        model = U2Model(cfg.model, cmvn)
        if paths.init_model:
            self._warm_start(model, paths.init_model)
        built = build_engine(model, cfg, ds_cfg, info)
        self.model = model
        self.engine, self.scheduler = built.engine, built.scheduler
        self.dtype, self.autocast = built.dtype, built.autocast
        self.compute_weights, self.clipper, self.graphed_layers = \
            built.compute_weights, built.clipper, built.graphed_layers
        self.grad_norm: torch.Tensor | None = None  # the last step's, when the trainer clips
        self.peak_tflops = peak_tflops(torch.cuda.get_device_name(info.device)) if info.device.type == "cuda" else None
        self.features = FeatureExtractor(cfg.data).to(info.device) if cfg.data.device_features else None
        self.ckpt_root = paths.exp_dir / "checkpoints"
        self.reporter = Reporter(paths.exp_dir, info.is_main)
        self.blank_watch = BlankOutputWatch(cfg.optim.warmup_steps)
        # Entered around training (run_training); beaten at every step, evaluation batch and
        # checkpoint.
        self.watchdog = StepWatchdog(paths.exp_dir / "heartbeats", info.rank, info.world_size,
                                     cfg.train.watchdog_seconds)
        self.epoch = 0
        self.batches_in_epoch = 0
        self.last_saved_step = -1
        # Spent in evaluate() and save(): not counted against --max-minutes, so that runs with
        # different eval and checkpoint settings (or checkpoint sizes) compare at equal training time.
        self.paused_seconds = 0.0

    # ----------------------------------------------------------------------------------- set-up
    def _warm_start(self, model: torch.nn.Module, path: str) -> None:
        source, _, _ = load_model_file(path)
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        if missing or unexpected:
            raise ConfigError(f"{path}: does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")

    def _loader(self, shards: str, train: bool):
        t = self.cfg.train
        return build_dataloader(shards, self.tokenizer, self.cfg.data, train=train, seed=t.seed,
                                rank=self.info.rank, world_size=self.info.world_size,
                                num_workers=t.num_workers, prefetch_factor=t.prefetch_factor,
                                pin_memory=self.info.device.type == "cuda")

    # ----------------------------------------------------------------------------------- steps
    def _inputs(self, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, ...]:
        device = self.info.device
        if self.features is not None:
            self.features.train(train)
            feats, lens = self.features(batch["wavs"].to(device, non_blocking=True),
                                        batch["wav_lengths"].to(device, non_blocking=True))
        else:
            feats = batch["feats"].to(device, non_blocking=True)
            lens = batch["feats_lengths"].to(device, non_blocking=True)
        return (feats.to(self.dtype), lens, batch["target"].to(device, non_blocking=True),
                batch["target_lengths"].to(device, non_blocking=True))

    def train_step(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward, backward and (at an accumulation boundary) optimizer step on one micro-batch:
        (the loss terms and frame count as device scalars, whether the optimizer stepped)."""
        feats, lens, target, target_lens = self._inputs(batch, train=True)
        # Through the backward too: activation checkpointing recomputes layers there, on the
        # same weights as their forward.
        with self._on_compute_weights():
            out = self.engine(feats, lens, target, target_lens)
            self.engine.backward(out["loss"])
        if self.compute_weights is not None:
            self.compute_weights.move_grads()
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.clipper is not None:
            self.grad_norm = self.clipper()
        self.engine.step()
        # Detached: callers keep the result through the next step, which must not keep this
        # step's autograd graph alive too.
        return {**out, "loss": out["loss"].detach(), "frames": lens.sum()}, boundary

    def _all_to_all_seconds(self) -> Callable[[], float] | None:
        """Under expert parallelism, the time the expert all-to-alls take (for the log)."""
        if self.cfg.train.expert_parallel_size == 1 or not self.model.moe_layers():
            return None
        return self.model.time_expert_exchanges().take

    def batch_frames(self, batch: dict[str, Any]) -> list[int]:
        """Fbank frames of each utterance, from the batch's host-side lengths (no device read)."""

        if "feats_lengths" in batch:
            return batch["feats_lengths"].tolist()
        data = self.cfg.data  # features are made on the device from the waveforms
        return [num_frames(n, data.fbank, data.sample_rate) for n in batch["wav_lengths"].tolist()]

    def batch_flops(self, batch: dict[str, Any]) -> int:
        """Model FLOPs of a training step on this batch."""

        return training_flops(self.cfg.model, self.batch_frames(batch), batch["target_lengths"].tolist())

    def _client_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def _last_grad_norm(self) -> float | None:
        """The last optimizer step's gradient norm (the trainer's or ZeRO's), None before the first."""
        norm = self.grad_norm if self.clipper is not None else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def save(self) -> None:
        if self.last_saved_step == self.engine.global_steps:  # e.g. save_interval hit the last step
            return
        grad_norm = self._last_grad_norm()
        if grad_norm is not None and not math.isfinite(grad_norm):
            # Neither the trainer's clipping (trainer/clipping.py) nor ZeRO's bf16 without its
            # overflow check (ds_configs/) skips such steps: never overwrite good checkpoints with NaN weights.
            raise RuntimeError(f"step {self.engine.global_steps}: gradient norm {grad_norm}, training "
                               f"diverged; not checkpointing. Resume from the last checkpoint in {self.ckpt_root} "
                               "with a lower optim.lr")
        self.last_saved_step = self.engine.global_steps
        with self._paused():
            save_checkpoint(self.engine, self.ckpt_root, self.engine.global_steps, self._client_state(),
                            to_dict(self.cfg), self.cfg.train.keep_checkpoints)
        self.watchdog.beat(self.engine.global_steps)
        self.reporter.line(f"checkpoint {self.ckpt_root} step {self.engine.global_steps}")

    def resume(self) -> None:
        state = load_latest(self.engine, self.ckpt_root, to_dict(self.cfg))
        if state is None:
            return
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        # Its checkpoint is on disk: an epoch end at this same step does not write it again (a
        # rank killed while rewriting it would leave this step without any complete checkpoint).
        self.last_saved_step = self.engine.global_steps
        self.reporter.line(f"resumed from step {self.engine.global_steps} (epoch {self.epoch}, "
                           f"{self.batches_in_epoch} batches into it)")

    def _expert_load(self) -> torch.Tensor | None:
        layers = self.model.moe_layers()
        if not layers or layers[0][1].last_tokens_per_expert is None:
            return None
        return torch.stack([m.last_tokens_per_expert for _, m in layers]).float()  # one cast, not one per layer

    def train(self) -> None:
        t = self.cfg.train
        loader = self._loader(self.paths.train_shards, train=True)
        dev_loader = self._loader(self.paths.dev_shards, train=False)
        dev_loader.prefetch(0)  # every evaluation reads the dev set from its start (epoch 0)
        meter = ThroughputMeter(self.info.device, self.peak_tflops, self._all_to_all_seconds(),
                                lambda: self.paused_seconds)
        load_sum: torch.Tensor | None = None
        clock = StepClock(self.engine.global_steps, t.max_steps)
        done = bool(t.max_steps) and self.engine.global_steps >= t.max_steps
        # A training-time budget for this invocation, evaluation and checkpoints excluded: rank
        # 0's clock decides (one tiny all-reduce per step), so every rank stops after the same step.
        deadline = time.monotonic() + 60 * self.max_minutes if self.max_minutes else None
        while self.epoch < t.max_epochs and not done:
            self.engine.train()
            # The next epoch's workers fill their buffers during this one.
            batches = loader.epoch_batches(self.epoch, prefetch_next=self.epoch + 1 < t.max_epochs)
            for _ in range(self.batches_in_epoch):  # resume mid-epoch: the same stream, fast-forwarded
                next(batches, None)
                self.watchdog.beat(self.engine.global_steps)
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                waited = time.perf_counter() - waited
                if not every_rank(batch is not None, self.info.device):
                    self._report_left_out(loader, batches, batch)
                    break
                stepped = time.perf_counter()
                out, boundary = self.train_step(batch)
                stepped = time.perf_counter() - stepped
                self.watchdog.beat(self.engine.global_steps)
                self.batches_in_epoch += 1
                meter.add(sum(batch["durations"]), out, waited, self.batch_flops(batch), stepped)
                load = self._expert_load()
                if load is not None:
                    load_sum = load if load_sum is None else load_sum + load
                if not boundary:
                    continue
                step = self.engine.global_steps
                if step % t.log_interval == 0:
                    self._log(step, meter, load_sum, clock.eta_seconds(step))
                    load_sum = None
                if t.eval_interval and step % t.eval_interval == 0:
                    self.evaluate(dev_loader, step)
                    self.engine.train()
                if t.save_interval and step % t.save_interval == 0:
                    self.save()
                if t.max_steps and step >= t.max_steps:
                    done = True
                    break
                over = deadline is not None and time.monotonic() - self.paused_seconds >= deadline
                if deadline is not None and any_rank(self.info.is_main and over, self.info.device):
                    self.reporter.line(f"stopping at step {step}: --max-minutes {self.max_minutes:g} reached "
                                       f"({self.paused_seconds:.1f} s of evaluation and checkpoints excluded)")
                    done = True
                    break
            if self.batches_in_epoch == 0:
                raise DataPrepError(f"epoch {self.epoch} ended before its first step: a rank read no training "
                                   f"batch from {self.paths.train_shards} (too few utterances or all filtered out?)")
            if not done:
                self.epoch += 1
                self.batches_in_epoch = 0
                self.evaluate(dev_loader, self.engine.global_steps)
            if done or t.epoch_checkpoints or self.epoch >= t.max_epochs:
                self.save()
        run = meter.run_summary()
        self.reporter.line(f"trained {run['audio_seconds']:.0f} s of audio in {run['training_seconds']:.1f} s of "
                           f"training time: {run['audio_s_per_s']:.1f} s of audio per second (evaluation and "
                           "checkpoints excluded)")
        self.reporter.scalars("run", run, self.engine.global_steps)
        self.reporter.close()

    def _report_left_out(self, loader: Any, batches: Iterator[dict[str, Any]], batch: dict[str, Any] | None) -> None:
        """Ranks end an epoch together when the first runs out of batches: read what this rank
        still holds to the end, and log the share of the epoch's utterances no rank trained on."""
        left = 0
        while batch is not None:
            left += len(batch["keys"])
            batch = next(batches, None)
            self.watchdog.beat(self.engine.global_steps)
        counts = torch.tensor([loader.epoch_stats.utterances, left], dtype=torch.float64, device=self.info.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        total, left = (int(n) for n in counts.tolist())
        share = left / max(total, 1)
        self.reporter.line(f"epoch {self.epoch}: {left} of {total} utterances ({100 * share:.1f}%) left out: "
                           "ranks end an epoch when the first runs out of data")
        self.reporter.scalars("epoch_data", {"epoch": self.epoch, "utterances": total, "left_out": left,
                                             "left_out_share": share}, self.engine.global_steps)

    def _log(self, step: int, meter: ThroughputMeter, load_sum: torch.Tensor | None, eta: float | None) -> None:
        stats = meter.report()
        stats["lr"] = self.scheduler.get_last_lr()[0]
        grad_norm = self._last_grad_norm()
        stats["grad_norm"] = grad_norm if grad_norm is not None else float("nan")
        stats["gpu_mem_gb"], stats["gpu_mem_reserved_gb"] = gpu_memory_gb(self.info.device)
        if load_sum is not None:
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(load_sum)
            fractions = load_sum / load_sum.sum(dim=1, keepdim=True).clamp(min=1)
            stats["expert_load_max"] = float(fractions.max()) * fractions.size(1)
            if self.reporter.enabled:
                for (name, _), row in zip(self.model.moe_layers(), fractions.tolist()):
                    self.reporter.scalars(f"expert_load/{name}", {f"e{i}": f for i, f in enumerate(row)}, step)
        losses = " ".join(f"{k} {v:.3f}" for k, v in stats.items() if k.startswith("loss"))
        optional = f"mfu {100 * stats['mfu']:.1f}% " if "mfu" in stats else ""
        if "all_to_all_share" in stats:
            optional += f"all_to_all {100 * stats['all_to_all_share']:.0f}% "
        if self.graphed_layers:
            stats["cuda_graph_shapes"] = sum(len(r.graphs) for r in self.graphed_layers)
            stats["cuda_graph_eager_calls"] = sum(r.eager_calls for r in self.graphed_layers)
            optional += f"graphs {stats['cuda_graph_shapes']} (eager {stats['cuda_graph_eager_calls']}) "
        progress = f"step {step}/{self.cfg.train.max_steps} eta {format_duration(eta)}" if eta is not None \
            else f"step {step}"
        self.reporter.line(
            f"epoch {self.epoch} {progress} {losses} lr {stats['lr']:.2e} grad_norm {stats['grad_norm']:.3f} "
            f"frames/s {stats['frames_per_s']:.0f} audio_s/s {stats['audio_s_per_s']:.1f} "
            f"data_wait {100 * stats['data_wait_frac']:.0f}% in_step {100 * stats['in_step_frac']:.0f}% "
            f"TFLOP/s/GPU {stats['tflops_per_gpu']:.2f} {optional}"
            f"mem {stats['gpu_mem_gb']:.1f}/{stats['gpu_mem_reserved_gb']:.1f}GB")
        self.reporter.scalars("train", stats, step)

    @contextmanager
    def _paused(self) -> Iterator[None]:
        """Time outside training (evaluation, checkpoint writing), added to `paused_seconds`."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.paused_seconds += time.monotonic() - started

    def evaluate(self, dev_loader: Any, step: int) -> dict[str, float]:
        with torch.no_grad(), torch.autocast(self.info.device.type, dtype=self.autocast or torch.float32,
                                             enabled=self.autocast is not None), self._paused(), \
                self._on_compute_weights():
            return self._evaluate(dev_loader, step)

    @contextmanager
    def _on_compute_weights(self) -> Iterator[None]:
        """The model holds the bf16 compute weights, refreshed from the parameters, if it has any
        (the forwards of training and evaluation run in the same precision)."""
        weights = self.compute_weights
        if weights is None:
            yield
            return
        weights.refresh()
        with weights.swapped_in():
            yield

    def _evaluate(self, dev_loader: Any, step: int) -> dict[str, float]:
        """Dev losses (averaged over the utterances of all ranks) and CTC-greedy CER/WER.

        Ranks run forward passes in lock-step (expert all-to-all), so a rank whose dev data is
        exhausted keeps stepping on a placeholder batch, with zero weight, until every rank is done.
        """

        self.engine.eval()
        model = self.engine.module
        dev_loader.set_epoch(0)
        limit = self.cfg.train.max_eval_batches
        sums: dict[str, float] = {}
        pairs: list[tuple[str, str]] = []
        utts = count = 0
        batches = iter(dev_loader)
        while True:
            batch = next(batches, None) if not limit or count < limit else None
            if not any_rank(batch is not None, self.info.device):
                break
            real = batch is not None
            batch = batch if real else self._placeholder_batch()
            feats, lens, target, target_lens = self._inputs(batch, train=False)
            memory, valid = model.encoder(feats, lens)
            self.watchdog.beat(step)
            count += 1
            # A placeholder still runs the decoders (their MoE layers exchange frames too) and
            # names the loss terms, so every rank reduces the same list.
            weight = len(batch["keys"]) if real else 0
            for k, v in model.losses(memory, valid, target, target_lens).items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
            if not real:
                continue
            utts += weight
            hyps = ctc_greedy_search(model.ctc.log_softmax(memory), valid.sum(1))
            for ref, hyp in zip(batch["target"].tolist(), hyps):
                pairs.append((self.tokenizer.decode([t for t in ref if t >= 0]), self.tokenizer.decode(hyp)))
        names = sorted(sums)
        total = torch.tensor([utts] + [sums.get(k, 0.0) for k in names], dtype=torch.float64,
                             device=self.info.device)
        gathered = [pairs]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, pairs)
        result = {k: v / max(total[0].item(), 1) for k, v in zip(names, total[1:].tolist())}
        all_pairs = [p for part in gathered for p in part]
        if all_pairs:
            errors = score([r for r, _ in all_pairs], [h for _, h in all_pairs])
            empty = 100 * sum(not h for _, h in all_pairs) / len(all_pairs)
            result.update(cer=100 * errors.cer.rate, wer=100 * errors.wer.rate, empty=empty)
            warning = self.blank_watch.update(step, empty)
            if warning is not None and self.info.is_main:
                logger.warning(warning)
        self.reporter.line(dev_line(step, int(total[0]), result))
        self.reporter.scalars("dev", result, step)
        # The next evaluation's workers open the shards and fill their sort buffers during the
        # training in between, so that no evaluation waits for a cold start.
        dev_loader.prefetch(0)
        return result

    def _placeholder_batch(self) -> dict[str, Any]:
        """One second of silence with a one-token transcript: keeps a rank in lock-step."""
        mel = self.cfg.data.fbank.num_mel_bins
        rate = self.cfg.data.sample_rate
        return {"keys": ["<placeholder>"], "feats": torch.zeros(1, 100, mel),
                "feats_lengths": torch.tensor([100]), "wavs": torch.zeros(1, rate),
                "wav_lengths": torch.tensor([rate]), "target": torch.tensor([[1]]),
                "target_lengths": torch.tensor([1]), "durations": [1.0]}


def run_training(cfg: ExperimentConfig, paths: TrainPaths, info: DistInfo, max_steps: int | None,
                 max_minutes: float | None = None, run_log: RunLog | None = None) -> None:
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    # Every check before anything is written (the inputs by the caller, `paths.check`; the config
    # and the checkpoint to resume here): a refused start leaves the exp dir as it was, and its
    # checkpoints exportable.
    trainer = Trainer(cfg, paths, info, max_minutes)
    trainer.resume()
    paths.exp_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        (paths.exp_dir / "train.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (paths.exp_dir / "paths.json").write_text(json.dumps({k: str(v) for k, v in vars(paths).items()}, indent=1))
    if run_log is not None:
        run_log.open(paths.exp_dir)
    with trainer.watchdog:
        trainer.train()

"""Rank-0 progress reporting: a compact log line and TensorBoard scalars.

Throughput counts every rank's data (all-reduced at log time, not per step), so frames/s and
seconds-of-audio/s are the whole job's.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("u2moe.train")
METRICS_FILE = "metrics.jsonl"


class BlankOutputWatch:
    """Tells once when the dev CTC output has stayed empty since the learning-rate warm-up ended.

    An encoder still on CTC's all-blank plateau then rarely leaves it, while the attention
    decoders keep lowering the total loss by learning the transcripts, so the loss alone does not
    show it (as big_dense at lr 1e-3 showed: configs/presets/big_dense.yaml).
    """

    def __init__(self, warmup_steps: int, patience: int = 3, threshold: float = 99.0):
        self.warmup_steps, self.patience, self.threshold = warmup_steps, patience, threshold
        self.streak = 0
        self.told = False

    def update(self, step: int, empty_percent: float) -> str | None:
        """empty_percent: dev utterances whose CTC greedy hypothesis is empty. A warning the first
        time `patience` evaluations in a row after the warm-up find nearly all of them empty."""
        if step < self.warmup_steps or empty_percent < self.threshold:
            self.streak = 0
            return None
        self.streak += 1
        if self.told or self.streak < self.patience:
            return None
        self.told = True
        return (f"dev CTC output empty for {empty_percent:.1f}% of utterances at {self.patience} evaluations "
                f"in a row since the warm-up ended (step {step}): the encoder is not learning; a lower "
                f"optim.lr usually lets it")


class StepClock:
    """Time left to train.max_steps, from the steps this invocation has run so far (evaluations
    and checkpoints included: the estimate is of the wall time the user waits)."""

    def __init__(self, first_step: int, max_steps: int):
        self.first_step, self.max_steps = first_step, max_steps
        self.started = time.monotonic()

    def eta_seconds(self, step: int) -> float | None:
        done = step - self.first_step
        if not self.max_steps or done <= 0:
            return None
        return (time.monotonic() - self.started) / done * max(0, self.max_steps - step)


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def dev_line(step: int, utterances: int, metrics: dict[str, float]) -> str:
    """The log line of one dev evaluation (bench/plot_dev_loss.py reads it back from logs)."""
    return f"dev step {step} utts {utterances} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())


class ThroughputMeter:
    """Frames, audio seconds and loss terms since the last report, summed over all ranks.

    Device values are accumulated on the device and read once per report: a `.item()` per step
    would stall the host on the GPU every step.
    """

    def __init__(self, device: torch.device, peak_tflops: float | None = None,
                 comm_seconds: Callable[[], float] | None = None,
                 paused_seconds: Callable[[], float] = lambda: 0.0):
        self.device = device
        self.peak_tflops = peak_tflops  # per GPU; MFU is reported when known
        # Seconds spent in expert all-to-alls since the last call (this rank), when timed.
        self.comm_seconds = comm_seconds
        # The trainer's running total of seconds spent outside training (evaluation, checkpoint
        # writing): left out of every rate, which would otherwise depend on the eval settings.
        self.paused_seconds = paused_seconds
        self.run_start, self.run_paused_start = time.perf_counter(), paused_seconds()
        self.run_audio_seconds = 0.0  # this rank's, since construction
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.paused_start = self.paused_seconds()
        self.audio_seconds = 0.0
        self.data_seconds = 0.0
        self.step_seconds = 0.0
        self.flops = 0
        self.batches = 0
        self.sums: dict[str, torch.Tensor] = {}

    def _training_seconds(self, start: float, paused_start: float) -> float:
        return max(time.perf_counter() - start - (self.paused_seconds() - paused_start), 1e-9)

    def run_summary(self) -> dict[str, float]:
        """Collective: audio seconds trained by all ranks since construction, the training time
        (pauses excluded) and their ratio."""
        audio = torch.tensor([self.run_audio_seconds], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(audio)
        seconds = self._training_seconds(self.run_start, self.run_paused_start)
        return {"audio_seconds": audio.item(), "training_seconds": seconds, "audio_s_per_s": audio.item() / seconds}

    def add(self, audio_seconds: float, values: dict[str, torch.Tensor], data_seconds: float,
            flops: int = 0, step_seconds: float = 0.0) -> None:
        """values: device scalars (loss terms, frames) of one micro-batch; data_seconds: time the
        loop waited for this batch (a data-bound run shows it); flops: its model FLOPs
        (model/flops.py), counted on the host; step_seconds: host time in the training step.
        A host-bound step's time is its host time: what is in neither share is the loop's own."""
        self.audio_seconds += audio_seconds
        self.run_audio_seconds += audio_seconds
        self.data_seconds += data_seconds
        self.step_seconds += step_seconds
        self.flops += flops
        self.batches += 1
        for name, value in values.items():
            value = value.detach().double()
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def report(self) -> dict[str, float]:
        """Collective: every rank must call it at the same step. Frames and audio are totals
        per second of training (pauses excluded); everything else is a mean per micro-batch."""
        names = sorted(self.sums)
        host = torch.tensor([self.audio_seconds, self.batches, self.flops], dtype=torch.float64)
        local = torch.cat([host.to(self.device)] + [self.sums[n].to(self.device).reshape(1) for n in names])
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(local)
        elapsed = self._training_seconds(self.start, self.paused_start)
        audio, batches, flops, *sums = local.tolist()
        # Rank 0's own wait: the slowest reader shows as every rank waiting in the next collective.
        out = {"audio_s_per_s": audio / elapsed, "data_wait_frac": self.data_seconds / elapsed,
               "in_step_frac": self.step_seconds / elapsed,
               "tflops_per_gpu": flops / elapsed / world / 1e12}
        if self.peak_tflops:
            out["mfu"] = out["tflops_per_gpu"] / self.peak_tflops
        if self.comm_seconds is not None:
            out["all_to_all_share"] = self.comm_seconds() / elapsed
        for name, value in zip(names, sums):
            if name == "frames":
                out["frames_per_s"] = value / elapsed
            else:
                out[name] = value / max(batches, 1)
        self.reset()
        return out


class Reporter:
    """Writes lines to the log, scalars to TensorBoard and to `metrics.jsonl`, on rank 0 only.

    metrics.jsonl has one JSON object per report ({"split", "step", ...}): plots and tests read
    it without TensorBoard.
    """

    def __init__(self, exp_dir: Path, enabled: bool):
        self.enabled = enabled
        self.exp_dir = exp_dir
        self.writer = None
        self.jsonl = exp_dir / METRICS_FILE

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if self.writer is None:  # on the first report: nothing is written before training starts
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.exp_dir / "tensorboard"))
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"split": prefix, "step": step, **values}) + "\n")

    def line(self, text: str) -> None:
        if self.enabled:
            logger.info(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def gpu_memory_gb(device: torch.device) -> tuple[float, float]:
    """Peak GiB allocated by tensors, and reserved by the caching allocator (what a memory cap
    and the card's size bound)."""
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30

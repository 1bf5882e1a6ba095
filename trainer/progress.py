"""Rank-0 progress reporting: a compact log line and TensorBoard scalars.

Throughput counts every rank's data (all-reduced at log time, not per step), so frames/s and
seconds-of-audio/s are the whole job's.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("u2moe.train")


class ThroughputMeter:
    """Frames, audio seconds and loss terms since the last report, summed over all ranks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.frames = 0.0
        self.audio_seconds = 0.0
        self.batches = 0
        self.loss_sums: dict[str, float] = {}

    def add(self, frames: int, audio_seconds: float, losses: dict[str, torch.Tensor]) -> None:
        self.frames += frames
        self.audio_seconds += audio_seconds
        self.batches += 1
        for name, value in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value)

    def report(self) -> dict[str, float]:
        """Collective: every rank must call it at the same step."""
        names = sorted(self.loss_sums)
        local = torch.tensor([self.frames, self.audio_seconds, self.batches]
                             + [self.loss_sums[n] for n in names], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        frames, audio, batches = local[:3].tolist()
        out = {"frames_per_s": frames / elapsed, "audio_s_per_s": audio / elapsed}
        out.update({n: v / max(batches, 1) for n, v in zip(names, local[3:].tolist())})
        self.reset()
        return out


class Reporter:
    """Writes lines to the log, scalars to TensorBoard and to `metrics.jsonl`, on rank 0 only.

    metrics.jsonl has one JSON object per report ({"split", "step", ...}): plots and tests read
    it without TensorBoard.
    """

    def __init__(self, exp_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = exp_dir / "metrics.jsonl"
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(exp_dir / "tensorboard"))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
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


def gpu_memory_gb(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30

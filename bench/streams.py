"""`u2moe bench streams`: how many concurrent streams one device keeps at real time, per preset.

B streams step together: each step takes one chunk of every stream (chunk_size encoder frames,
chunk_size * subsampling fbank frames of audio: 640 ms at chunk 16, subsampling 4 and a 10 ms
shift) and answers it. B keeps real time when the p99 step latency is below the chunk's audio
duration: every stream's chunk is answered before its next chunk has arrived. The step is timed
from the fbank window on the host to the chunk's best CTC unit per frame back on the host: the
window's upload, the encoder's fixed-shape chunk step with its caches (a bounded left context;
inference/streaming/fixed_stream.py), the CTC log posteriors and the download. Fbank (the
host's, per stream) and the prefix beam search (host, per stream) are excluded: both run beside
the device on the host's cores. Each step runs eagerly, or replayed as one CUDA graph.

B is searched by doubling from 1 until a batch misses real time (or the device runs out of
memory), then by bisection. p99 is the nearest-rank percentile of `--steps` timed steps (the
slowest step when there are at most 100), after warm-up steps that fill the caches. Weights are
random: the cost does not depend on their values, only the experts' loads do, and random routing
spreads frames about evenly.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..configs.experiment import load_config
from ..configs.loading import ConfigError
from ..inference.decoding.device import DTYPES, prepare_model
from ..inference.streaming.cuda_graph import CapturedStep, refuse_ungraphable
from ..inference.streaming.fixed_stream import FixedShapeStream
from ..model.asr_model import U2Model
from .handler import logged_run

logger = logging.getLogger("u2moe.bench.streams")

MODES = ("eager", "graphed")


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("streams", help="concurrent real-time streams one device serves, per preset")
    p.add_argument("--configs", default="dense_225m,moe_1b,dense_1b", help="comma-separated presets or yaml paths")
    p.add_argument("--device", default="cuda", help="cuda[:N] or cpu")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: eager, graphed (CUDA graphs)")
    p.add_argument("--chunk-size", type=int, default=16, help="encoder frames per chunk")
    p.add_argument("--left-chunks", type=int, default=4, help="left chunks each stream's cache keeps")
    p.add_argument("--budget-ms", type=float, default=0.0, help="latency a step must stay below; "
                   "default: 0, the chunk's audio duration (real time)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per batch size before the timed ones")
    p.add_argument("--max-streams", type=int, default=65536, help="largest batch tried")
    p.add_argument("--precision", type=float, default=1 / 16, help="bisection ends when the streams that "
                   "miss real time are within this fraction above those that keep it")
    p.add_argument("--json", default=None, help="also write the results, every batch size tried, here")
    p.set_defaults(handler=logged_run(run_streams, logger, (ValueError, ConfigError)))


@dataclass
class Latency:
    """Step latencies in seconds over the timed steps (fewer when a batch missed real time early)."""

    p50: float
    p99: float
    steps: int


@dataclass
class Point:
    """One batch size tried: its latency, or None where it did not fit in the device's memory."""

    streams: int
    latency: Latency | None
    peak_gib: float | None = None

    def keeps(self, budget: float) -> bool:
        return self.latency is not None and self.latency.p99 < budget


@dataclass
class Capacity:
    budget: float  # seconds: the chunk's audio
    streams: int  # the most streams found to keep real time (0: not even one)
    latency: Latency | None  # at those streams
    limited_by: str  # "time", "memory" or "max-streams"
    points: list[Point] = field(default_factory=list)


def nearest_rank(samples: list[float], q: float) -> float:
    """The q-quantile as the ceil(q * n)-th smallest sample."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def time_steps(step: Callable[[], None], steps: int, warmup: int, budget: float) -> Latency:
    """Latency of `steps` calls of step (each ends with its result on the host), after `warmup`.
    Stops early once more steps missed the budget than the p99 allows: that batch fails anyway."""
    for _ in range(warmup):
        step()
    allowed_misses = steps - math.ceil(0.99 * steps)
    samples: list[float] = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
        if sum(s >= budget for s in samples) > allowed_misses:
            break
    return Latency(nearest_rank(samples, 0.5), nearest_rank(samples, 0.99), len(samples))


def find_capacity(measure: Callable[[int], Point], budget: float, max_streams: int, precision: float) -> Capacity:
    """The most streams whose measured p99 stays below budget: doubling from 1, then bisection
    until the bracket is within `precision` of the lower end."""
    points: dict[int, Point] = {}

    def tried(streams: int) -> Point:
        points[streams] = measure(streams)
        return points[streams]

    keeps, misses = 0, None
    while misses is None and keeps < max_streams:
        streams = min(2 * keeps, max_streams) if keeps else 1
        if tried(streams).keeps(budget):
            keeps = streams
        else:
            misses = streams
    while misses is not None and misses - keeps > max(1.0, keeps * precision):
        streams = (keeps + misses) // 2
        if tried(streams).keeps(budget):
            keeps = streams
        else:
            misses = streams
    if misses is None:
        limited_by = "max-streams"
    else:
        limited_by = "memory" if points[misses].latency is None else "time"
    found = points.get(keeps)
    return Capacity(budget, keeps, found.latency if found else None, limited_by, [points[s] for s in sorted(points)])


class StreamStep:
    """One step of `streams` streams of a model: the fbank window from the host, the encoder's
    chunk step, CTC log posteriors and each frame's best unit back on the host."""

    def __init__(self, model: U2Model, streams: int, chunk_size: int, left_chunks: int, graphed: bool):
        encoder = model.encoder
        weight = encoder.after_norm.weight
        self.stream = FixedShapeStream(encoder, streams, chunk_size, left_chunks)
        geo = self.stream.geometry
        on_cuda = weight.device.type == "cuda"
        # Random fbank made on the device (quicker than on the host at 10^4 streams), kept on the
        # host as a runtime's feature buffers would be: pinned, for asynchronous uploads.
        window = torch.randn(streams, geo.window, encoder.cfg.input_size, device=weight.device).to(weight.dtype)
        self.host_window = window.cpu().pin_memory() if on_cuda else window
        self.window = torch.empty_like(window)
        self.num_valid = torch.full((streams,), chunk_size, device=weight.device)
        self.host_units = torch.empty(streams, chunk_size, dtype=torch.long,
                                      pin_memory=on_cuda)

        def answer(window: torch.Tensor, num_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out, _ = self.stream.step(window, num_valid)
            log_probs = model.ctc.log_softmax(out)
            return log_probs, log_probs.argmax(dim=-1)

        self.run: Callable[..., tuple[torch.Tensor, torch.Tensor]] = answer
        if graphed:
            refuse_ungraphable(encoder)
            self.run = CapturedStep(answer, (self.window, self.num_valid))
        self.stream.reset()

    def __call__(self) -> None:
        self.window.copy_(self.host_window, non_blocking=True)
        _, units = self.run(self.window, self.num_valid)
        self.host_units.copy_(units)  # waits for the step: the answer is on the host


def _measure(model: U2Model, args: argparse.Namespace, graphed: bool, budget: float) -> Callable[[int], Point]:
    on_cuda = model.ctc.ctc_lo.weight.device.type == "cuda"

    def measure(streams: int) -> Point:
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            step = StreamStep(model, streams, args.chunk_size, args.left_chunks, graphed)
            latency = time_steps(step, args.steps, args.warmup, budget)
        except torch.OutOfMemoryError:
            latency = None
        step = None  # the caches and the graph's memory go back before the next batch size
        gc.collect()
        peak = None
        if on_cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
        point = Point(streams, latency, peak)
        logger.info("%d streams: %s", streams, "out of memory" if latency is None else
                    f"p50 {latency.p50 * 1e3:.1f} ms, p99 {latency.p99 * 1e3:.1f} ms over {latency.steps} steps")
        return point

    return measure


def run_streams(args: argparse.Namespace) -> dict[str, dict[str, Capacity]]:
    modes = args.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"--modes: choose from {', '.join(MODES)}, not {args.modes!r}")
    if args.chunk_size <= 0 or args.left_chunks < 0 or args.steps <= 0 or args.max_streams < 1:
        raise ValueError("need --chunk-size > 0, --left-chunks >= 0, --steps > 0 and --max-streams >= 1")
    results: dict[str, dict[str, Capacity]] = {}
    for preset in args.configs.split(","):
        cfg = load_config(preset)
        chunk_audio = args.chunk_size * cfg.model.encoder.subsampling * cfg.data.fbank.frame_shift / 1000
        budget = args.budget_ms / 1000 or chunk_audio
        torch.manual_seed(0)
        with torch.device(args.device):  # initialised in place: a 1B model's init is slow on a host
            model = prepare_model(U2Model(cfg.model), args.device, args.dtype)
        results[preset] = {}
        with torch.inference_mode():
            for mode in modes:
                logger.info("%s, %s: real time is a p99 step below %.0f ms", preset, mode, budget * 1e3)
                measure = _measure(model, args, mode == "graphed", budget)
                results[preset][mode] = find_capacity(measure, budget, args.max_streams, args.precision)
        del model
        gc.collect()
    _print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({preset: {mode: asdict(c) for mode, c in by_mode.items()} for preset, by_mode in results.items()},
                      f, indent=1)
            f.write("\n")
    return results


def _print_table(results: dict[str, dict[str, Capacity]], args: argparse.Namespace) -> None:
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    budgets = sorted({f"{c.budget * 1e3:.0f}" for by_mode in results.values() for c in by_mode.values()})
    print(f"Concurrent real-time streams on {device}, {args.dtype}, chunk {args.chunk_size} "
          f"(p99 budget {'/'.join(budgets)} ms), {args.left_chunks} left chunks; step latency from the host's "
          f"fbank window to the chunk's best units on the host (fbank and search excluded); p99 of "
          f"{args.steps} steps")
    print("| preset | mode | streams | p50 ms | p99 ms | limited by | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset, by_mode in results.items():
        for mode, cap in by_mode.items():
            lat = cap.latency
            peak = next((p.peak_gib for p in cap.points if p.streams == cap.streams), None)
            cells = [preset, mode, str(cap.streams), f"{lat.p50 * 1e3:.1f}" if lat else "-",
                     f"{lat.p99 * 1e3:.1f}" if lat else "-", cap.limited_by,
                     f"{peak:.1f}" if peak is not None else "-"]
            print("| " + " | ".join(cells) + " |")
    for mode in MODES:
        found = {preset: by_mode[mode].streams for preset, by_mode in results.items() if mode in by_mode}
        moe = found.get("moe_1b")
        for baseline in ("dense_225m", "dense_1b"):
            if moe is not None and found.get(baseline):
                print(f"{mode}: moe_1b serves {moe / found[baseline]:.2f}x the streams of {baseline}")

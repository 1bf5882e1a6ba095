"""`u2moe bench train`: where a training step's time goes, without the rest of a run.

Builds the trainer exactly as `u2moe train` does (config, DeepSpeed engine, expert parallelism),
then measures (on every rank of a launched job; rank 0 reports, see below):
- the input pipeline alone: one pass over the training shards with the configured workers
  (seconds of audio per second, and the wait for the first batch, which every epoch pays);
- the training step alone: `Trainer.train_step` on batches read once and kept in memory, so no
  data wait (seconds of audio per second, milliseconds per step); with `--utt-seconds`, on
  those utterances joined into longer ones (a long-utterance corpus's step, from a short one);
- with `--live-steps`, the training step fed by the running input pipeline, as `u2moe train`
  feeds it (workers decoding beside the step, no synchronisation per step): against the
  in-memory steps, what sharing the host with the data workers costs;
- host synchronisations per step (CUDA's sync debug mode; each names the line that caused it);
- with `--profile`, torch.profiler over a few steps: the GPU's kernel time per step (compute and
  NCCL apart), and the operators that take the most host and device time; and as many steps
  timed by phase (forward, backward, optimizer step, each waited for on the device), which shows
  where ZeRO's gradient reduction and parameter gathering land.
A run whose step rate is far above its loader rate is data-bound; a step whose kernel time is far
below its wall time is host-bound (launch overhead, synchronisations).
Under the deepspeed launcher every rank measures (the collectives keep them in step) and rank 0
reports: the figures of one card of a multi-GPU job.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..configs.data import DataConfig
from ..data_prep.batching import bucket_batches, collate, dynamic_batches
from ..data_prep.features import num_frames, samples_for_frames
from ..data_prep.sample_processor import Sample
from ..trainer.cli import add_model_and_data_arguments
from ..trainer.distributed import cap_gpu_memory, distributed
from ..trainer.train import Trainer, TrainPaths
from ..trainer.vocab_size import load_training_config

logger = logging.getLogger("u2moe.bench.train")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_loader(trainer: Any, max_batches: int, max_epochs: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Reads at most max_batches over at most max_epochs, epoch after epoch as training does (each
    epoch's workers started while the one before is read). The cold start (shards opened, shuffle
    and sort buffers filled before the first batch) is paid once per run and reported apart; the
    rate counts from the first batch on. A worker holding less than its shuffle buffer yields
    nothing until it has decoded all of it and then its whole epoch at once, so on a small corpus
    only a pass over several epochs shows the rate that training sees. Also returns the first
    batches, for the step measurement."""
    loader = trainer._loader(trainer.paths.train_shards, train=True)
    started = time.perf_counter()
    first: float | None = None
    audio = 0.0  # after the first batch
    first_audio = 0.0
    count = epochs = 0
    epoch_waits: list[float] = []
    kept: list[dict[str, Any]] = []
    while epochs < max_epochs and count < max_batches:
        epoch_started = time.perf_counter()
        batches = loader.epoch_batches(epochs, prefetch_next=epochs + 1 < max_epochs)
        epochs += 1
        for index, batch in enumerate(batches):
            now = time.perf_counter()
            if first is None:
                first, first_audio = now, sum(batch["durations"])
            else:
                audio += sum(batch["durations"])
                if index == 0:
                    epoch_waits.append(now - epoch_started)
            if len(kept) < 64:
                kept.append(batch)
            count += 1
            if count >= max_batches:
                break
    elapsed = time.perf_counter() - (first or started)
    loader.drop_prefetch()  # its workers would fill their buffers beside the timed steps
    if first is None:
        raise SystemExit(f"{trainer.paths.train_shards}: the loader yielded no batch")
    return {"loader_audio_s_per_s": audio / elapsed if count > 1 else 0.0,
            "loader_audio_seconds": first_audio + audio, "loader_first_batch_s": first - started,
            "loader_epoch_start_wait_s": max(epoch_waits, default=0.0),
            "loader_batches": count, "loader_epochs": epochs, "loader_seconds": elapsed}, kept


def _utterances(batch: dict[str, Any]) -> Iterator[tuple[str, float, list[int], torch.Tensor]]:
    """(key, duration, target, waveform or features) of each utterance of a collated batch, unpadded."""
    audio, lengths = ((batch["wavs"], batch["wav_lengths"]) if "wavs" in batch
                      else (batch["feats"], batch["feats_lengths"]))
    for i, key in enumerate(batch["keys"]):
        target = batch["target"][i, :batch["target_lengths"][i]].tolist()
        yield key, batch["durations"][i], target, audio[i, :lengths[i]]


def stitch_batches(batches: list[dict[str, Any]], utt_seconds: float, data: DataConfig) -> list[dict[str, Any]]:
    """The batches' utterances joined in order (audio or features, and transcripts) into
    utterances of at least `utt_seconds`, batched again within the frame budget as the loader
    batches (bucket shapes for `data.batch.type: bucket`, which CUDA graphs replay; dynamic
    otherwise): the step of a long-utterance corpus (LibriSpeech averages 12 s) measured with a
    short-utterance one. A joined utterance longer than the budget is left out; the tail shorter
    than `utt_seconds` too."""

    budget = data.batch.max_frames_in_batch
    waves = "wavs" in batches[0]
    joined: list[Sample] = []
    parts: list[tuple[str, float, list[int], torch.Tensor]] = []
    for utterance in (u for batch in batches for u in _utterances(batch)):
        parts.append(utterance)
        duration = sum(p[1] for p in parts)
        if duration < utt_seconds:
            continue
        audio = torch.cat([p[3] for p in parts])
        length = num_frames(len(audio), data.fbank, data.sample_rate) if waves else len(audio)
        if length <= budget:
            joined.append(Sample("+".join(p[0] for p in parts), length, duration, [t for p in parts for t in p[2]],
                                 feats=None if waves else audio, wave=audio if waves else None))
        parts = []
    if data.batch.type == "bucket":
        return [collate(group, pad_frames=frames, pad_samples=samples_for_frames(frames, data.fbank, data.sample_rate),
                        tokens_multiple=data.batch.bucket_tokens)
                for group, frames in bucket_batches(joined, budget, data.batch.bucket_frames)]
    return [collate(b) for b in dynamic_batches(joined, budget)]


def measure_steps(trainer: Any, batches: list[dict[str, Any]], steps: int) -> dict[str, float]:
    device = trainer.info.device
    trainer.engine.train()
    # Warm-up: kernels, allocator, autotuning; with CUDA graphs every batch twice, since a
    # shape is captured when it comes back, so that the timed steps replay as training does.
    for batch in (batches * 2 if trainer.graphed_layers else batches[:3]):
        trainer.train_step(batch)
    _sync(device)
    times, audio, flops = [], 0.0, 0
    started = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        trainer.train_step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
        audio += sum(batch["durations"])
        flops += trainer.batch_flops(batch)
    elapsed = time.perf_counter() - started
    tflops = flops / elapsed / 1e12
    mfu = {"step_mfu": tflops / trainer.peak_tflops} if trainer.peak_tflops else {}
    frames = sum(sum(trainer.batch_frames(b)) for b in batches)
    # The mean too: the live steps (measure_live_steps) have only a mean, and a step whose time
    # varies with its batch (the MoE's group sizes) has a mean above its median.
    return {"step_ms_median": 1000 * statistics.median(times), "step_ms_mean": 1000 * statistics.mean(times),
            "step_audio_s_per_s": audio / elapsed,
            "step_tflops": tflops, **mfu, "steps": steps,
            "batch_audio_s_mean": sum(sum(b["durations"]) for b in batches) / len(batches),
            "batch_frames_mean": frames / len(batches)}


def measure_live_steps(trainer: Any, steps: int, warmup: int = 3) -> dict[str, float]:
    """`steps` training steps on batches as the loader delivers them, epoch after epoch with the
    next one prefetched (Trainer.train's loop without its logging and evaluation)."""
    device = trainer.info.device
    loader = trainer._loader(trainer.paths.train_shards, train=True)
    trainer.engine.train()
    audio = waited = in_step = 0.0
    done, epoch, started = 0, 0, 0.0
    while done < warmup + steps:
        batches = loader.epoch_batches(epoch)
        while done < warmup + steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            trainer.train_step(batch)
            t2 = time.perf_counter()
            done += 1
            if done == warmup:
                _sync(device)
                started = time.perf_counter()
            elif done > warmup:
                audio += sum(batch["durations"])
                waited += t1 - t0
                in_step += t2 - t1
        epoch += 1
    _sync(device)
    elapsed = time.perf_counter() - started
    return {"live_steps": steps, "live_audio_s_per_s": audio / elapsed, "live_data_wait_frac": waited / elapsed,
            "live_in_step_frac": in_step / elapsed, "live_step_ms_mean": 1000 * in_step / steps}


def count_syncs(trainer: Any, batch: dict[str, Any]) -> dict[str, int]:
    """Host-device synchronisations in one step, by the source line that caused them."""
    if trainer.info.device.type != "cuda":
        return {}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step(batch)
            _sync(trainer.info.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return dict(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                        if "synchroniz" in str(w.message)).most_common())


def measure_phases(trainer: Any, batches: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """Milliseconds per step in the engine's forward, backward and optimizer step, the device
    synchronised around each (so no phase hides in the next one's launches), and in the rest of
    the step (inputs, fbank on the device, clipping). Slower than an unsynchronised step by the
    overlap it removes."""
    device, engine = trainer.info.device, trainer.engine
    spent: Counter[str] = Counter()

    def timed(phase: str, fn: Any) -> Any:
        def run_timed(*args: Any, **kwargs: Any) -> Any:
            _sync(device)
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            _sync(device)
            spent[phase] += time.perf_counter() - started
            return result
        return run_timed

    phases = {"forward": "forward", "backward": "backward", "step": "optimizer"}
    for method, phase in phases.items():  # instance attributes shadow the engine's methods
        setattr(engine, method, timed(phase, getattr(engine, method)))
    try:
        _sync(device)
        started = time.perf_counter()
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])
        _sync(device)
        wall = time.perf_counter() - started
    finally:
        for method in phases:
            delattr(engine, method)
    result = {f"phase_{phase}_ms": 1000 * spent[phase] / steps for phase in phases.values()}
    result["phase_other_ms"] = 1000 * (wall - sum(spent.values())) / steps
    return result


def profile_steps(trainer: Any, batches: list[dict[str, Any]], steps: int, out: Path | None,
                  tables: bool = True) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    device = trainer.info.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])
        _sync(device)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    result: dict[str, Any] = {"profile_steps": steps, "profile_wall_ms_per_step": 1000 * wall / steps}
    # Operator calls are what a host-bound step pays for, kernel launches or not (CPU included).
    result["aten_ops_per_step"] = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        # NCCL runs on its own stream beside the compute (ZeRO's overlap_comm). The compute
        # stream's kernels do not overlap each other: their sum is the time it was busy.
        comm_us = sum(e.self_device_time_total for e in kernels if e.key.startswith("nccl"))
        compute_us = sum(e.self_device_time_total for e in kernels) - comm_us
        result["gpu_compute_ms_per_step"] = compute_us / 1000 / steps
        result["gpu_nccl_ms_per_step"] = comm_us / 1000 / steps
        result["kernels_per_step"] = sum(e.count for e in kernels) / steps
    if tables:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=30))
        print(events.table(sort_by="self_cpu_time_total", row_limit=20))
        print(events.table(sort_by="count", row_limit=30))  # where a host-bound step's launches come from
    if out is not None:
        prof.export_chrome_trace(str(out.with_suffix(".trace.json")))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.loader_batches < 1 or args.loader_epochs < 1:
        raise SystemExit("--loader-batches and --loader-epochs must be at least 1")
    cfg = load_training_config(args.config, args.set, args.units)
    with distributed() as info, tempfile.TemporaryDirectory() as exp_dir:
        cap_gpu_memory(info.device, args.max_gpu_memory_gb)
        paths = TrainPaths(args.train_shards, args.train_shards, args.units, args.cmvn, Path(exp_dir),
                           args.ds_config)
        trainer = Trainer(cfg, paths, info)
        result: dict[str, Any] = {"config": args.config, "device": torch.cuda.get_device_name(info.device)
                                  if info.device.type == "cuda" else "cpu",
                                  "parameters": sum(p.numel() for p in trainer.model.parameters())}
        loader, batches = measure_loader(trainer, args.loader_batches, args.loader_epochs)
        result.update(loader)
        logger.info("loader: %s", json.dumps(loader))
        if args.utt_seconds:
            batches = stitch_batches(batches, args.utt_seconds, cfg.data)
            if not batches:
                raise SystemExit(f"--utt-seconds {args.utt_seconds}: no joined utterance fits "
                                 f"data.batch.max_frames_in_batch={cfg.data.batch.max_frames_in_batch}")
            result["utt_seconds_mean"] = statistics.mean(d for b in batches for d in b["durations"])
        result.update(measure_steps(trainer, batches, args.steps))
        if trainer.graphed_layers:
            # Eager calls after the warm-up would mean timed steps that did not replay.
            result["cuda_graph_shapes"] = sum(len(r.graphs) for r in trainer.graphed_layers)
            result["cuda_graph_eager_calls"] = sum(r.eager_calls for r in trainer.graphed_layers)
        if args.live_steps:
            result.update(measure_live_steps(trainer, args.live_steps))
        result["syncs_per_step"] = count_syncs(trainer, batches[0])
        if args.profile:
            result.update(measure_phases(trainer, batches, args.profile))
            trace = Path(args.json) if args.json and info.is_main else None
            result.update(profile_steps(trainer, batches, args.profile, trace, tables=info.is_main))
            if "gpu_compute_ms_per_step" in result:
                # Against the unprofiled step: the profiler slows the host, not the kernels.
                result["gpu_busy_frac"] = result["gpu_compute_ms_per_step"] / result["step_ms_mean"]
        trainer.reporter.close()
    if info.device.type == "cuda":
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated(info.device) / 1e9
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(info.device) / 1e9
    result["world_size"] = info.world_size
    if info.is_main:
        print(json.dumps(result, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training step and input pipeline rates, host syncs, profile")
    add_model_and_data_arguments(p)
    p.add_argument("--loader-batches", type=int, default=200, help="batches read in the loader measurement")
    p.add_argument("--loader-epochs", type=int, default=3,
                   help="epochs the loader measurement reads at most (a small corpus needs several to show "
                        "the rate training sees)")
    p.add_argument("--steps", type=int, default=50, help="training steps timed on in-memory batches")
    p.add_argument("--live-steps", type=int, default=0, metavar="STEPS",
                   help="also time this many steps fed by the running input pipeline")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many steps, and time as many by phase")
    p.add_argument("--utt-seconds", type=float, default=None,
                   help="time the steps on the loader's utterances joined into ones of at least this length "
                        "(e.g. 12, LibriSpeech's mean), batched within the same frame budget")
    p.add_argument("--json", default=None, help="also write the figures here (and the trace next to it)")
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(args)
    return 0

"""`u2moe bench moe` (GPU training step of one FFN layer), `u2moe bench moe-ep` (the same under
expert parallelism, one process per GPU) and `u2moe bench moe-infer` (CPU, batch 1).

`moe`: forward + backward time of the dense FFN, the ideal top-k MoE (k x dense), DeepSpeed's
native MoE (drop_tokens=False), a per-expert loop (our `reference` backend) and our layer with
each GPU backend, for each (T, d, FFN) shape, dense and with padding. CUDA events, median of
`--iters` steps after warm-up. `--cuda-graphs` adds the dense FFN and our GPU backends with the
step replayed as one CUDA graph (`*_graphed` columns): the layer without its host launches.

`moe-ep`: started by a launcher (`torchrun --nproc_per_node P -m u2moe bench moe-ep`), each rank
with T frames of its own: our layer with its experts split over the P ranks (all-to-all
dispatch) against the same layer with every expert on each rank (no exchange), and the share of
the expert-parallel step spent in the all-to-alls. Runs on CPU with gloo too (fp32).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..configs.model import FeedForwardConfig
from ..model.feed_forward import PositionwiseFeedForward
from ..model.moe.all_to_all_dispatcher import AllToAllTimer
from ..model.moe.backends import GEMMS
from ..model.moe.layer import MoEFeedForward
from ..trainer.distributed import DistInfo, distributed

SHAPES = ((16384, 512, 2048), (32768, 256, 2048), (16384, 1024, 4096))


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` steps after `warmup`: CUDA events on a GPU, wall time on CPU."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1e3)
    return times


def _train_step(module: nn.Module, x: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor]
                ) -> Callable[[], None]:
    grad = torch.randn_like(x)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        call(x).backward(grad)
    return step


def graphed_train_step(module: nn.Module, x: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor],
                       grad: torch.Tensor | None = None) -> Callable[[], None]:
    """`_train_step`'s forward + backward captured once as a CUDA graph; the step replays it.

    What the layer costs without the host's launches, as `train.cuda_graphs` runs it. Warmed up
    on a side stream first (Triton's autotuning and cuBLAS's workspaces must not happen inside
    the capture). Every replay writes the gradients afresh (they are the capture's outputs, not
    accumulated into). The call must not read device values on the host: under padding, our
    layer keeps the padded frames in place, skipped (`static_shapes`), instead of removing them.
    grad: the output's gradient (random by default).
    """
    grad = torch.randn_like(x) if grad is None else grad
    # The capture differentiates a fresh leaf on x's memory: an autograd graph that is still held
    # elsewhere (DeepSpeed's MoE keeps its last aux loss) keeps x's gradient node of an earlier
    # eager step alive, on the default stream, and the capture may not wait for that stream.
    leaf = x.detach().requires_grad_()

    def clear() -> None:
        module.zero_grad(set_to_none=True)
        leaf.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            clear()
            call(leaf).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(leaf).backward(grad)
    x.grad = leaf.grad  # the replays write into it
    return graph.replay


def _batch(frames: int, dim: int, pad: float, device: torch.device, dtype: torch.dtype = torch.bfloat16
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch = 16
    x = torch.randn(batch, frames // batch, dim, device=device, dtype=dtype, requires_grad=True)
    if pad == 0:
        return x, None
    # Lengths spread evenly over [1 - 2 pad, 1] of the longest: `pad` of the frames are padding.
    t = frames // batch
    lengths = torch.linspace(1 - 2 * pad, 1.0, batch, device=device) * t
    return x, torch.arange(t, device=device)[None, :] < lengths.round().long()[:, None]


def _deepspeed_moe(dim: int, hidden: int, experts: int, top_k: int) -> nn.Module | None:
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
    except ImportError:
        return None
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        deepspeed.init_distributed(dist_backend="nccl", rank=0, world_size=1)
    expert = PositionwiseFeedForward(dim, hidden, "swish", 0.0)
    moe = MoE(dim, expert, num_experts=experts, ep_size=1, k=top_k, drop_tokens=False,
              use_rts=False)
    moe.set_deepspeed_parallelism()
    return moe


def bench_moe(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for frames, dim, hidden in args.shapes:
        cfg = FeedForwardConfig(type="moe", hidden_units=hidden, dropout_rate=0.0,
                                num_experts=args.experts, top_k=args.top_k)
        torch.manual_seed(0)
        dense = PositionwiseFeedForward(dim, hidden, "swish", 0.0).to(device, torch.bfloat16)
        moe = MoEFeedForward(dim, cfg).to(device, torch.bfloat16)
        ds_moe = _deepspeed_moe(dim, hidden, args.experts, args.top_k)
        if ds_moe is not None:
            ds_moe = ds_moe.to(device, torch.bfloat16)
        for pad in (0.0, 0.2):
            x, valid = _batch(frames, dim, pad, device)
            row = {"T": frames, "d": dim, "ffn": hidden, "pad": pad}
            run = lambda m, f: statistics.median(
                time_steps(_train_step(m, x, f), device, args.warmup, args.iters))
            row["dense"] = run(dense, lambda t: dense(t))
            row["ideal"] = args.top_k * row["dense"]
            if ds_moe is not None:
                # DeepSpeed's layer takes no mask: it routes the padded frames too.
                row["deepspeed"] = run(ds_moe, lambda t: ds_moe(t)[0])
            for backend in args.backends:
                moe.experts.backend = backend
                row[backend] = run(moe, lambda t: moe(t, valid))
            if args.cuda_graphs:
                replayed = lambda m, f: statistics.median(
                    time_steps(graphed_train_step(m, x, f), device, args.warmup, args.iters))
                row["dense_graphed"] = replayed(dense, lambda t: dense(t))
                row["ideal_graphed"] = args.top_k * row["dense_graphed"]
                moe.use_static_shapes(True)
                # A graph holds no host read: the backends that make none.
                for backend in (b for b in args.backends if b in GEMMS and not GEMMS[b].reads_host):
                    moe.experts.backend = backend
                    row[f"{backend}_graphed"] = replayed(moe, lambda t: moe(t, valid))
                moe.use_static_shapes(False)
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
    if args.profile:
        _profile(args)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "experts": args.experts, "top_k": args.top_k, "rows": rows}


def _profile(args: argparse.Namespace) -> None:
    """Where our layer's time goes, kernel by kernel, at the first of --shapes (for misses); with
    --cuda-graphs also of the replayed steps, ours and the dense FFN's (the graphed ideal's)."""
    frames, dim, hidden = args.shapes[0]
    cfg = FeedForwardConfig(type="moe", hidden_units=hidden, dropout_rate=0.0,
                            num_experts=args.experts, top_k=args.top_k)
    moe = MoEFeedForward(dim, cfg).to("cuda", torch.bfloat16)
    dense = PositionwiseFeedForward(dim, hidden, "swish", 0.0).to("cuda", torch.bfloat16)
    x, valid = _batch(frames, dim, 0.0, torch.device("cuda"))
    steps = [(backend, False) for backend in args.backends]
    if args.cuda_graphs:
        steps += [("dense", True)] + [(b, True) for b in args.backends if b in GEMMS and not GEMMS[b].reads_host]
    for name, graphed in steps:
        module = dense if name == "dense" else moe
        if module is moe:
            moe.experts.backend = name
        moe.use_static_shapes(graphed)
        step = (graphed_train_step if graphed else _train_step)(module, x, lambda t: module(t, valid))
        for _ in range(3):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"--- profile {name}{' graphed' if graphed else ''} (5 steps, T={frames} d={dim} ffn={hidden})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    moe.use_static_shapes(False)


def bench_moe_ep(args: argparse.Namespace) -> dict:
    with distributed() as info:
        dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
        rows = _moe_ep_rows(args, info, dtype)
    return {"device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
            "dtype": str(dtype), "experts": args.experts, "top_k": args.top_k,
            "rows": rows, "main": info.is_main}


def _moe_ep_rows(args: argparse.Namespace, info: DistInfo, dtype: torch.dtype) -> list[dict]:
    world = dist.get_world_size()
    rows = []
    for frames, dim, hidden in args.shapes:
        cfg = FeedForwardConfig(type="moe", hidden_units=hidden, dropout_rate=0.0,
                                num_experts=args.experts, top_k=args.top_k)
        torch.manual_seed(0)  # the same weights on every rank
        local = MoEFeedForward(dim, cfg).to(info.device, dtype)
        split = copy.deepcopy(local)
        split.shard_experts(dist.group.WORLD)
        torch.manual_seed(1 + info.rank)  # frames of its own on each rank
        x, valid = _batch(frames, dim, args.pad, info.device, dtype)
        local_ms = time_steps(_train_step(local, x, lambda t: local(t, valid)), info.device,
                               args.warmup, args.iters)
        step = _train_step(split, x, lambda t: split(t, valid))
        time_steps(step, info.device, args.warmup, 0)
        timer = AllToAllTimer()
        split.time_exchanges(timer)
        ep_ms = time_steps(step, info.device, 0, args.iters)
        a2a_ms = timer.take() * 1e3
        mine = {"local_ms": statistics.median(local_ms), "ep_ms": statistics.median(ep_ms),
                "a2a_share": a2a_ms / sum(ep_ms)}
        every = [None] * world
        dist.all_gather_object(every, mine)
        row = {"T_per_rank": frames, "d": dim, "ffn": hidden, "pad": args.pad, "ranks": world,
               # The slowest rank paces a collective step.
               "ep_ms": max(r["ep_ms"] for r in every), "local_ms": max(r["local_ms"] for r in every),
               "a2a_share": statistics.mean(r["a2a_share"] for r in every)}
        rows.append(row)
        if info.is_main:
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
    return rows


def _shape(text: str) -> tuple[int, int, int]:
    frames, dim, hidden = (int(v) for v in text.split(","))
    return frames, dim, hidden


def bench_moe_infer(args: argparse.Namespace) -> dict:
    """Batch-1 inference on CPU: one MoE layer vs the dense FFN of the same expert size."""
    torch.set_num_threads(args.threads)
    rows = []
    for dim, hidden in ((128, 512), (704, 2816)):
        cfg = FeedForwardConfig(type="moe", hidden_units=hidden, dropout_rate=0.0)
        moe, dense = MoEFeedForward(dim, cfg).eval(), PositionwiseFeedForward(dim, hidden, "swish", 0.0)
        for frames in (16, 250):
            x = torch.randn(1, frames, dim)
            row = {"d": dim, "ffn": hidden, "frames": frames}
            for name, module in (("dense", dense), ("moe", moe)):
                with torch.inference_mode():
                    for _ in range(5):
                        module(x)
                    start = time.perf_counter()
                    for _ in range(args.iters):
                        module(x)
                row[f"{name}_ms"] = (time.perf_counter() - start) / args.iters * 1e3
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
    return {"threads": args.threads, "rows": rows}


def _run(fn: Callable[[argparse.Namespace], dict]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        result = fn(args)
        if args.out and result.pop("main", True):  # one writer under a launcher
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    return handler


def _training_step_arguments(p: argparse.ArgumentParser) -> None:
    """What `moe` and `moe-ep` share: the layer's routing and the timing loop."""
    p.add_argument("--shapes", type=_shape, nargs="+", default=list(SHAPES), metavar="T,D,FFN",
                   help="frames (per rank under moe-ep), model dim, expert hidden size; the profile "
                        "takes the first")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the results as JSON here (rank 0 under a launcher)")


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="MoE layer training step on one GPU, all paths")
    _training_step_arguments(p)
    p.add_argument("--backends", nargs="+", default=["reference", "grouped_mm", "triton"])
    p.add_argument("--profile", action="store_true",
                   help="kernel tables of our layer (with --cuda-graphs: also replayed, and the dense FFN's)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time the dense FFN and our GPU backends with each step replayed as a CUDA graph")
    p.set_defaults(handler=_run(bench_moe))
    p = sub.add_parser("moe-ep", help="MoE layer training step, expert parallel (start it with a launcher)")
    _training_step_arguments(p)
    p.add_argument("--pad", type=float, default=0.0, help="share of padded frames")
    p.set_defaults(handler=_run(bench_moe_ep))
    p = sub.add_parser("moe-infer", help="MoE layer inference, batch 1, on CPU")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(handler=_run(bench_moe_infer))

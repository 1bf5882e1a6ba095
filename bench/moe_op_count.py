"""ATen operators one feed-forward block calls in a training step (forward + backward), dense FFN
against the MoE layer, as the GPU path runs it (`grouped_mm` backend, bf16 autocast), counted on
the CPU: what a host-bound step pays per block, a launch for about each.

Only top-level operators are counted (those no other ATen operator called), so that the CPU
fallback loop inside `torch._grouped_mm` counts once, as the GPU's single kernel does; views
(reshape, transpose, select, ...) and allocations are listed apart, since they launch no kernel.

    python -m u2moe.bench.moe_op_count [--dim 256 --hidden 1024 --experts 8 --top-k 2] [--list]
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from ..configs.model import FeedForwardConfig
from ..model.feed_forward import PositionwiseFeedForward
from ..model.moe.layer import MoEFeedForward

NO_KERNEL = {"aten::view", "aten::reshape", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose",
             "aten::expand", "aten::detach", "aten::view_as", "aten::flatten", "aten::_reshape_alias",
             "aten::as_strided", "aten::select", "aten::slice", "aten::resolve_conj", "aten::empty",
             "aten::empty_strided", "aten::new_empty"}


def top_level_ops(layer: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor) -> Counter:
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, valid)
        y.float().sum().backward()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: Counter = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--list", action="store_true", help="also list the MoE layer's operators")
    args = p.parse_args()
    os.environ["U2MOE_EXPERT_BACKEND"] = "grouped_mm"  # read when the layer is built

    torch.manual_seed(0)
    x = torch.randn(8, 100, args.dim, requires_grad=True)
    valid = torch.arange(100)[None] < torch.tensor([100, 90, 80, 95, 100, 70, 60, 85])[:, None]
    cfg = FeedForwardConfig(type="moe", hidden_units=args.hidden, num_experts=args.experts, top_k=args.top_k)
    for name, layer in (("dense", PositionwiseFeedForward(args.dim, args.hidden, "swish", 0.1)),
                        ("moe", MoEFeedForward(args.dim, cfg))):
        counts = top_level_ops(layer, x, valid)
        kernels = {k: v for k, v in counts.items() if k not in NO_KERNEL}
        print(f"{name}: {sum(kernels.values())} operators ({sum(counts.values()) - sum(kernels.values())} "
              f"views and allocations besides)")
        if args.list and name == "moe":
            for op, n in sorted(kernels.items(), key=lambda kv: -kv[1]):
                print(f"  {n:3d} {op}")


if __name__ == "__main__":
    main()

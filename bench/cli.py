"""`u2moe bench ...`: one group for every benchmark command."""
from __future__ import annotations

import argparse

from . import memory, moe_layer, rtf, streams, train_step


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmarks (RTF, real-time streams, MoE layer, training step, memory model)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for module in (rtf, streams, moe_layer, train_step, memory):
        module.register_bench(bench_sub)

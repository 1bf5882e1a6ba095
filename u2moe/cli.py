"""The `u2moe` command line: one entry point, one subcommand per job.

Each subsystem owns its subcommands in its own `cli.py` and registers them here, so that
`u2moe --help` stays fast (heavy imports happen inside the handlers). Benchmarks share one
`u2moe bench` group: their modules register under it with `register_bench`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from u2moe.help_format import HelpParser

# Modules whose `register(subparsers)` adds top-level commands.
_REGISTRARS = [
    "u2moe.model.cli",
    "u2moe.data_prep.cli",
    "u2moe.trainer.cli",
    "u2moe.demo",
]
# Modules whose `register_bench(subparsers)` adds `u2moe bench ...` commands.
_BENCH_REGISTRARS: list[str] = [
    "u2moe.model.decoding.rtf",
    "u2moe.model.moe.bench",
    "u2moe.trainer.bench",
    "u2moe.trainer.memory",
]


def build_parser() -> argparse.ArgumentParser:
    parser = HelpParser(prog="u2moe", description=__doc__.splitlines()[0])
    # `deepspeed --module u2moe` inserts --local_rank=N before the command; LOCAL_RANK in the
    # environment is what the trainer reads.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _REGISTRARS:
        importlib.import_module(module).register(sub)
    if _BENCH_REGISTRARS:
        bench = sub.add_parser("bench", help="benchmarks (RTF, MoE layer, memory model)")
        bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
        for module in _BENCH_REGISTRARS:
            importlib.import_module(module).register_bench(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from u2moe.data_prep.errors import DataPrepError
    from u2moe.dataconf import ConfigError
    from u2moe.model.attention import avoid_per_shape_attention_plans

    args = build_parser().parse_args(argv)
    avoid_per_shape_attention_plans()
    try:
        code = args.handler(args) or 0
    except (ConfigError, DataPrepError) as err:
        # A user's mistake (a key, a file, a line): one clear line, not a traceback.
        print(f"u2moe {args.command}: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()

"""The `u2moe` command line (`python -m u2moe`): one entry point, one subcommand per job.

Each layer owns its subcommands in its own `cli.py` (data_prep, inference, trainer, bench) or
folder (demo) and registers them here; this module is the top of the import graph.
"""
from __future__ import annotations

import argparse
import sys

from .bench import cli as bench_cli
from .configs.loading import ConfigError
from .data_prep import cli as data_prep_cli
from .data_prep.errors import DataPrepError
from .demo import command as demo
from .help_format import HelpParser
from .inference import cli as inference_cli
from .model.attention import avoid_per_shape_attention_plans
from .trainer import cli as trainer_cli


def build_parser() -> argparse.ArgumentParser:
    parser = HelpParser(prog="u2moe", description=__doc__.splitlines()[0])
    # `deepspeed --module u2moe` inserts --local_rank=N before the command; LOCAL_RANK in the
    # environment is what the trainer reads.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (inference_cli, data_prep_cli, trainer_cli, demo, bench_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
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

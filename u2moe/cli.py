"""The `u2moe` command line: one entry point, one subcommand per job.

Each subsystem owns its subcommands in its own `cli.py` and registers them here, so that
`u2moe --help` stays fast (heavy imports happen inside the handlers).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, function) pairs; each function receives the subparsers object and adds its commands.
_REGISTRARS = [
    ("u2moe.model.cli", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="u2moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module, func in _REGISTRARS:
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.handler(args) or 0)


if __name__ == "__main__":
    main()

"""Model subcommands: `u2moe params`."""
from __future__ import annotations

import argparse
import json


def _params(args: argparse.Namespace) -> int:
    from u2moe.config import load_config
    from u2moe.model.params import count_config_parameters

    cfg = load_config(args.config, args.set)
    print(json.dumps(count_config_parameters(cfg.model)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="print parameter counts of a preset or config as one JSON line")
    p.add_argument("--config", required=True, help="preset name (e.g. moe_1b) or yaml path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. model.encoder.num_blocks=6 (repeatable)")
    p.set_defaults(handler=_params)

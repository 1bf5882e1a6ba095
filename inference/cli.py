"""Model subcommands: `u2moe params`, `u2moe decode`, `u2moe transcribe`, `u2moe export-runtime`."""
from __future__ import annotations

import argparse
import json

from ..configs.experiment import load_config
from ..model.params import count_config_parameters
from .decoding.arguments import add_decoding_arguments, add_input_arguments
from .decoding.command import decode_handler
from .export.command import register_export_runtime
from .transcribe_command import register_transcribe


def _params(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    print(json.dumps(count_config_parameters(cfg.model)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="print parameter counts of a preset or config as one JSON line")
    p.add_argument("--config", required=True, help="preset name (e.g. moe_1b) or yaml path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. model.encoder.num_blocks=6 (repeatable)")
    p.set_defaults(handler=_params)
    register_decoding(sub)
    register_transcribe(sub)
    register_export_runtime(sub)


def _decode(args: argparse.Namespace) -> int:
    return decode_handler(args)


def register_decoding(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="decode with a model file; write hypotheses, print CER/WER per mode")
    p.add_argument("--model", required=True, help="model.pt written by `u2moe export`")
    add_input_arguments(p)
    add_decoding_arguments(p, default_modes="ctc_greedy,ctc_prefix_beam,attention,attention_rescoring")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output dir: <mode>.txt (key text) and wer.json")
    p.set_defaults(handler=_decode)

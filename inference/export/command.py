"""`u2moe export-runtime`: a model file -> TorchScript (WeNet runtime) or ONNX files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...configs.loading import ConfigError
from ..model_file import load_model_file
from .onnx import export_onnx
from .torchscript import export_torchscript


def export_runtime_handler(args: argparse.Namespace) -> int:
    try:
        model, _, units = load_model_file(args.model)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # WeNet's runtime reads its unit table from a `units.txt` of `unit id` lines.
    (out / "units.txt").write_text("".join(f"{u} {i}\n" for i, u in enumerate(units)))
    if args.format == "torchscript":

        path = out / "final.zip"
        export_torchscript(model, path)
        written = [path]
    else:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"ONNX export needs the `export` extra (onnx, onnxscript): {err}") from err

        try:
            written = list(export_onnx(model, out, args.chunk_size, args.left_chunks).values())
        except ValueError as err:
            raise ConfigError(str(err)) from err
    print(json.dumps({"format": args.format, "files": [str(p) for p in written],
                      "units": str(out / "units.txt")}))
    return 0


def register_export_runtime(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-runtime",
                       help="export a model file for a runtime: TorchScript (WeNet's C++ runtime) or ONNX")
    p.add_argument("--model", required=True, help="model.pt written by `u2moe export`")
    p.add_argument("--out", required=True, help="output dir: final.zip (torchscript) or "
                   "encoder.onnx, ctc.onnx, decoder.onnx; units.txt")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    p.add_argument("--chunk-size", type=int, default=16,
                   help="ONNX: encoder frames per chunk (the TorchScript model takes any chunk size)")
    p.add_argument("--left-chunks", type=int, default=4,
                   help="ONNX: cached left chunks, >= 0 (fixed-size cache); TorchScript takes any")
    p.set_defaults(handler=export_runtime_handler)

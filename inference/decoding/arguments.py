"""Command-line arguments shared by `u2moe decode` and `u2moe bench rtf`."""
from __future__ import annotations

import argparse

from ...model.asr_model import U2Model
from ..streaming.cuda_graph import StreamGraphs
from .search import DecodeOptions


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """--shards/--data-dir, shared by decoding and the RTF benchmark."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shard list file (one tar path or URL a line)")
    src.add_argument("--data-dir", help="Kaldi data dir (wav.scp, text)")


def add_decoding_arguments(p: argparse.ArgumentParser, default_modes: str) -> None:
    p.add_argument("--modes", default=default_modes, help="comma-separated: ctc_greedy, ctc_prefix_beam, "
                   "attention, attention_rescoring")
    p.add_argument("--beam", type=int, default=10)
    p.add_argument("--ctc-weight", type=float, default=0.3, help="CTC score weight in rescoring")
    p.add_argument("--reverse-weight", type=float, default=0.5, help="right-to-left decoder weight in rescoring")
    p.add_argument("--chunk-size", type=int, default=-1, help="> 0: simulated streaming with chunks of "
                   "this many encoder frames; -1: full context")
    p.add_argument("--left-chunks", type=int, default=-1, help="left chunks kept when streaming (-1: all)")
    p.add_argument("--cuda-graphs", action="store_true", help="streaming on CUDA: replay the encoder's chunk "
                   "step as a CUDA graph (fixed shapes: needs --chunk-size > 0, --left-chunks >= 0, and bf16 "
                   "for MoE experts)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))


def options(args: argparse.Namespace) -> "DecodeOptions":
    return DecodeOptions(beam=args.beam, ctc_weight=args.ctc_weight, reverse_weight=args.reverse_weight,
                         chunk_size=args.chunk_size, left_chunks=args.left_chunks)


def stream_graphs(args: argparse.Namespace, model: U2Model) -> StreamGraphs | None:
    """The CUDA graphs `--cuda-graphs` asks for (a ValueError where they cannot be made), or None."""
    if not args.cuda_graphs:
        return None
    return StreamGraphs(model.encoder, args.chunk_size, args.left_chunks)

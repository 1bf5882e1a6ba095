"""Host time of the CTC prefix beam search (inference/decoding/ctc_prefix_beam.py), in microseconds
per encoder frame, on synthetic CTC posteriors of two shapes: "peaky" (a trained model's: most
frames blank, the others one clear unit) and "flat" (an untrained model's, as in `u2moe bench rtf`).
The search runs on the host in every decode with ctc_prefix_beam or attention_rescoring, streaming
included, whatever the model's device (docs/decoding.md).

    python -m u2moe.bench.prefix_beam_speed [--vocab 5000 --frames 300 --utts 10 --beam 10]
"""
from __future__ import annotations

import argparse
import time

import torch

from ..inference.decoding.ctc_prefix_beam import ctc_prefix_beam_search


def posteriors(kind: str, utts: int, frames: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    logits = torch.randn(utts, frames, vocab, generator=generator)
    if kind == "flat":
        return (0.5 * logits).log_softmax(-1)
    # 70% of frames blank-dominated, the rest one unit's spike.
    spike = torch.where(torch.rand(utts, frames, generator=generator) < 0.7, 0,
                        torch.randint(1, vocab, (utts, frames), generator=generator))
    return logits.scatter_add(-1, spike.unsqueeze(-1), torch.full((utts, frames, 1), 12.0)).log_softmax(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--frames", type=int, default=300, help="encoder frames per utterance (300: 12 s at 4x)")
    p.add_argument("--utts", type=int, default=10)
    p.add_argument("--beam", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    lengths = torch.full((args.utts,), args.frames)
    for kind in ("peaky", "flat"):
        log_probs = posteriors(kind, args.utts, args.frames, args.vocab, torch.Generator().manual_seed(0))
        ctc_prefix_beam_search(log_probs[:1], lengths[:1], args.beam)  # warm-up
        start = time.perf_counter()
        ctc_prefix_beam_search(log_probs, lengths, args.beam)
        elapsed = time.perf_counter() - start
        print(f"{kind}: {1e6 * elapsed / (args.utts * args.frames):.0f} us per frame "
              f"(beam {args.beam}, vocab {args.vocab}, {args.utts} x {args.frames} frames)")


if __name__ == "__main__":
    main()

"""One entry point for a batch: encode once, then run any of the four decoding modes on it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...model.asr_model import U2Model
from ..streaming.cuda_graph import StreamGraphs
from ..streaming.encoder_stream import encode_chunk_by_chunk
from ..streaming.fixed_stream import encode_with_fixed_shapes
from .attention_beam import attention_beam_search
from .ctc_greedy import ctc_greedy_search
from .ctc_prefix_beam import ctc_prefix_beam_search
from .rescoring import attention_rescoring

MODES = ("ctc_greedy", "ctc_prefix_beam", "attention", "attention_rescoring")


@dataclass(frozen=True)
class DecodeOptions:
    beam: int = 10
    ctc_weight: float = 0.3
    reverse_weight: float = 0.5
    # > 0: simulated streaming, chunk by chunk with caches; <= 0: full context.
    chunk_size: int = -1
    left_chunks: int = -1


def check_modes(modes: list[str]) -> list[str]:
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown decoding mode(s) {unknown} (modes: {', '.join(MODES)})")
    return modes


def encode(model: U2Model, feats: torch.Tensor, feats_lengths: torch.Tensor, opts: DecodeOptions,
           graphs: StreamGraphs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output [B, T', D] and valid frames [B, T']; chunk by chunk when streaming, with
    the chunk step replayed as a CUDA graph where `graphs` (of opts' chunk setting) is given."""
    if graphs is not None:
        return encode_with_fixed_shapes(graphs.stream(feats.size(0)), feats, feats_lengths)
    if opts.chunk_size > 0:
        return encode_chunk_by_chunk(model.encoder, feats, feats_lengths, opts.chunk_size, opts.left_chunks)
    return model.encoder(feats, feats_lengths)


@torch.inference_mode()
def decode_batch(model: U2Model, feats: torch.Tensor, feats_lengths: torch.Tensor, modes: list[str],
                 opts: DecodeOptions, graphs: StreamGraphs | None = None) -> dict[str, list[list[int]]]:
    """Unit ids per utterance for each requested mode; the encoder and CTC run once."""
    memory, valid = encode(model, feats, feats_lengths, opts, graphs)
    return decode_encoded(model, memory, valid, modes, opts)


@torch.inference_mode()
def decode_encoded(model: U2Model, memory: torch.Tensor, valid: torch.Tensor, modes: list[str],
                   opts: DecodeOptions) -> dict[str, list[list[int]]]:
    """decode_batch from the encoder output (memory [B, T', D], valid [B, T'])."""
    lengths = valid.sum(dim=1)
    log_probs = model.ctc.log_softmax(memory)
    out: dict[str, list[list[int]]] = {}
    if "ctc_greedy" in modes:
        out["ctc_greedy"] = ctc_greedy_search(log_probs, lengths, model.ctc.blank_id)
    if "ctc_prefix_beam" in modes or "attention_rescoring" in modes:
        nbests = ctc_prefix_beam_search(log_probs, lengths, opts.beam, model.ctc.blank_id)
        if "ctc_prefix_beam" in modes:
            out["ctc_prefix_beam"] = [nbest[0][0] for nbest in nbests]
        if "attention_rescoring" in modes:
            out["attention_rescoring"] = attention_rescoring(model, memory, valid, nbests,
                                                             opts.ctc_weight, opts.reverse_weight)
    if "attention" in modes:
        out["attention"] = attention_beam_search(model, memory, valid, opts.beam)
    return out

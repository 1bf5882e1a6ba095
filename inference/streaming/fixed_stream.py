"""Streaming with fixed shapes: a batch of streams whose every chunk step has the same tensor
shapes and reads nothing back to the host, so that a CUDA graph can replay it (cuda_graph.py).

The caches are preallocated for a bounded left context (chunk_size * num_left_chunks key frames
per layer) with a validity mask, as WeNet's fixed-size runtime cache: slots not yet filled, and
frames past the end of a stream, are masked out. Each window is padded to the full window size,
and the chunk's real frames per stream come as a device tensor, not a host count.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ...model.encoder import ConformerEncoder
from .encoder_stream import ChunkGeometry


class ChunkStep(Protocol):
    """One chunk of every stream of a fixed batch: `FixedShapeStream` or its CUDA graph."""

    encoder: ConformerEncoder
    geometry: ChunkGeometry
    batch_size: int

    def reset(self, streams: torch.Tensor | None = None) -> None: ...

    def step(self, window: torch.Tensor, num_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class FixedShapeStream:
    """Caches of `batch_size` streams in buffers on the encoder's device and dtype."""

    def __init__(self, encoder: ConformerEncoder, batch_size: int, chunk_size: int, num_left_chunks: int):
        if num_left_chunks < 0:
            raise ValueError("fixed-shape streaming needs a bounded number of left chunks (>= 0), "
                             f"got {num_left_chunks}")
        self.encoder = encoder
        self.geometry = ChunkGeometry.of(encoder, chunk_size)
        self.batch_size = batch_size
        cfg = encoder.cfg
        weight = encoder.after_norm.weight
        cached = chunk_size * num_left_chunks
        d_k = cfg.output_size // cfg.attention_heads
        lorder = encoder.encoders[0].conv_module.lorder
        # Normal tensors even when made under inference_mode: a step outside it updates them in place.
        with torch.inference_mode(False):
            self.att_cache = weight.new_zeros(cfg.num_blocks, batch_size, cfg.attention_heads, cached, 2 * d_k)
            self.cnn_cache = weight.new_zeros(cfg.num_blocks, batch_size, cfg.output_size, lorder)
            self.cache_valid = torch.zeros(batch_size, cached, dtype=torch.bool, device=weight.device)
            self.frame_index = torch.arange(chunk_size, device=weight.device)

    def reset(self, streams: torch.Tensor | None = None) -> None:
        """Start `streams` ([B] bool; None: all) afresh: an empty attention cache and the
        convolution's zero left padding. In place, without host reads."""
        if streams is None:
            for buffer in (self.att_cache, self.cnn_cache, self.cache_valid):
                buffer.zero_()
            return
        # Zeroed as well as masked: a masked key has zero weight, but zero times a non-finite
        # value left by an earlier stream would still be NaN.
        self.att_cache.masked_fill_(streams.view(1, -1, 1, 1, 1), 0)
        self.cnn_cache.masked_fill_(streams.view(1, -1, 1, 1), 0)
        self.cache_valid.masked_fill_(streams.view(-1, 1), False)

    @torch.no_grad()
    def step(self, window: torch.Tensor, num_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """window [B, W, F] fbank (W = geometry.window, zero-padded past a stream's end);
        num_valid [B] real encoder frames of each stream in this chunk (0 to chunk_size; 0 once
        a stream has ended). Returns the chunk's encoder frames [B, chunk_size, D] and which of
        them are real [B, chunk_size]."""
        chunk_valid = self.frame_index < num_valid.unsqueeze(1)
        out = self.encoder.forward_chunk_in_place(window, chunk_valid, self.att_cache, self.cnn_cache,
                                                  self.cache_valid)
        return out, chunk_valid


def encode_with_fixed_shapes(stream: ChunkStep, feats: torch.Tensor, feats_lengths: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_chunk_by_chunk` with a fixed-shape step: (out [B, T', D], valid [B, T']) of a
    padded batch of stream.batch_size utterances, from fresh caches."""
    if feats.size(0) != stream.batch_size:
        raise ValueError(f"a batch of {feats.size(0)} utterances for a stream of {stream.batch_size}")
    encoder, geo = stream.encoder, stream.geometry
    starts = range(0, feats.size(1) - geo.right_context, geo.stride)
    num_out = int(encoder.embed.output_lengths(torch.tensor(feats.size(1)))) if starts else 0
    padded = F.pad(feats, (0, 0, 0, max(len(starts) * geo.stride + geo.window - geo.stride - feats.size(1), 0)))
    total = encoder.embed.output_lengths(feats_lengths)
    stream.reset()
    outs = []
    for i, start in enumerate(starts):
        num_valid = (total - i * geo.chunk_size).clamp(0, geo.chunk_size)
        out, _ = stream.step(padded[:, start:start + geo.window], num_valid)
        outs.append(out.clone())  # a graph's output buffer is overwritten by the next step
    out = torch.cat(outs, dim=1)[:, :num_out] if outs else feats.new_zeros(feats.size(0), 0, encoder.output_size())
    valid = torch.arange(out.size(1), device=out.device).unsqueeze(0) < total.unsqueeze(1)
    return out, valid

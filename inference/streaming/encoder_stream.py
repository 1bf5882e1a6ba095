"""Chunk-by-chunk encoding with attention and convolution caches (U2's streaming encoder).

A chunk of `chunk_size` encoder frames needs (chunk_size - 1) * rate + right_context + 1 fbank
frames, and the next chunk starts chunk_size * rate fbank frames later; because the Conv2d
front-end has no padding and chunks start on subsampling boundaries, each window's outputs are
exactly the full front-end's outputs for those frames. Keeping chunk_size * num_left_chunks key
frames per layer reproduces the full forward under the matching chunk mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...model.encoder import ConformerEncoder


@dataclass(frozen=True)
class ChunkGeometry:
    chunk_size: int  # encoder frames per chunk
    rate: int  # fbank frames per encoder frame
    right_context: int  # fbank frames the front-end looks ahead

    @classmethod
    def of(cls, encoder: ConformerEncoder, chunk_size: int) -> "ChunkGeometry":
        if chunk_size <= 0:
            raise ValueError(f"streaming needs a chunk size > 0, got {chunk_size}")
        return cls(chunk_size, encoder.embed.subsampling_rate, encoder.embed.right_context)

    @property
    def window(self) -> int:
        """fbank frames one chunk's window spans."""
        return (self.chunk_size - 1) * self.rate + self.right_context + 1

    @property
    def stride(self) -> int:
        """fbank frames between the starts of consecutive windows."""
        return self.chunk_size * self.rate


class EncoderStream:
    """Caches of one batch of streams; `step` encodes the next chunk of every stream."""

    def __init__(self, encoder: ConformerEncoder, chunk_size: int, num_left_chunks: int):
        self.encoder = encoder
        self.geometry = ChunkGeometry.of(encoder, chunk_size)
        self.required_cache_size = chunk_size * num_left_chunks if num_left_chunks >= 0 else -1
        self.reset()

    def reset(self) -> None:
        self.att_cache = torch.zeros(0, 0, 0, 0)
        self.cnn_cache = torch.zeros(0, 0, 0, 0)
        self.cache_valid: torch.Tensor | None = None  # [B, Tc]; None while every frame is real

    def step(self, window: torch.Tensor, num_valid: torch.Tensor | None = None) -> torch.Tensor:
        """window [B, W, F] fbank; num_valid [B]: real output frames of each stream in this chunk
        (None: all). Returns the chunk's encoder frames [B, T', D]."""
        num_out = int(self.encoder.embed.output_lengths(torch.tensor(window.size(1))))
        chunk_valid = None
        if num_valid is not None and bool((num_valid < num_out).any()):
            chunk_valid = torch.arange(num_out, device=window.device).unsqueeze(0) < num_valid.unsqueeze(1)
        key_valid = None
        if chunk_valid is not None or self.cache_valid is not None:
            b = window.size(0)
            cached = self.cache_valid if self.cache_valid is not None else torch.ones(
                b, self._cached_frames(), dtype=torch.bool, device=window.device)
            current = chunk_valid if chunk_valid is not None else torch.ones(
                b, num_out, dtype=torch.bool, device=window.device)
            key_valid = torch.cat([cached, current], dim=1)
        out, self.att_cache, self.cnn_cache = self.encoder.forward_chunk(
            window, self.att_cache, self.cnn_cache, self.required_cache_size, key_valid)
        if key_valid is not None:
            self.cache_valid = key_valid[:, key_valid.size(1) - self.att_cache.size(3):]
        return out

    def _cached_frames(self) -> int:
        return self.att_cache.size(3) if self.att_cache.dim() == 5 else 0


def encode_chunk_by_chunk(encoder: ConformerEncoder, feats: torch.Tensor, feats_lengths: torch.Tensor,
                          chunk_size: int, num_left_chunks: int = -1
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated streaming over a padded batch: (out [B, T', D], valid [B, T']) as the full
    forward with `decoding_chunk_size=chunk_size` returns them."""
    stream = EncoderStream(encoder, chunk_size, num_left_chunks)
    geo = stream.geometry
    total = encoder.embed.output_lengths(feats_lengths)
    outs: list[torch.Tensor] = []
    produced = 0
    for start in range(0, feats.size(1) - geo.right_context, geo.stride):
        remaining = (total - produced).clamp(min=0)
        out = stream.step(feats[:, start:start + geo.window], remaining)
        outs.append(out)
        produced += out.size(1)
    out = torch.cat(outs, dim=1) if outs else feats.new_zeros(feats.size(0), 0, encoder.output_size())
    valid = torch.arange(out.size(1), device=out.device).unsqueeze(0) < total.unsqueeze(1)
    return out, valid

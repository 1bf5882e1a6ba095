"""Padding, causal and chunk masks. Convention: True means "may attend" / "is a real frame"."""
from __future__ import annotations

import torch


def make_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """[B, T] bool, True at padded positions; T is max_len when given (the padded length, which
    no length exceeds: no device read then), else the longest length."""
    if max_len <= 0:
        max_len = int(lengths.max().item()) if lengths.numel() else 0
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) >= lengths.unsqueeze(1)


def make_non_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """[B, T] bool, True at real frames."""
    return ~make_pad_mask(lengths, max_len)


def subsequent_mask(size: int, device: torch.device | None = None) -> torch.Tensor:
    """[size, size] lower-triangular: position i sees positions <= i."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def subsequent_chunk_mask(
    size: int, chunk_size: int, num_left_chunks: int = -1, device: torch.device | None = None
) -> torch.Tensor:
    """[size, size]: frame i sees its own chunk, and `num_left_chunks` chunks before it (-1: all)."""
    pos = torch.arange(size, device=device)
    chunk_idx = pos // chunk_size
    end = ((chunk_idx + 1) * chunk_size).clamp(max=size)
    if num_left_chunks < 0:
        start = torch.zeros_like(pos)
    else:
        start = ((chunk_idx - num_left_chunks) * chunk_size).clamp(min=0)
    return (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))


def choose_chunk(
    num_frames: int,
    *,
    use_dynamic_chunk: bool,
    use_dynamic_left_chunk: bool,
    max_chunk_size: int,
    full_context_prob: float,
    static_chunk_size: int,
    decoding_chunk_size: int,
    num_decoding_left_chunks: int,
    training: bool,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Pick (chunk_size, num_left_chunks) for one batch; chunk_size <= 0 means full context.

    Training with dynamic chunks draws full context with probability `full_context_prob`, else a
    chunk size uniform in [1, max_chunk_size] and, optionally, a uniform number of left chunks.
    At inference the caller's decoding chunk size wins (0 or -1: full context).
    """
    if training and use_dynamic_chunk:
        if torch.rand((), generator=generator).item() < full_context_prob:
            return 0, -1
        chunk = int(torch.randint(1, max_chunk_size + 1, (), generator=generator).item())
        left = -1
        if use_dynamic_left_chunk:
            max_left = max((num_frames - 1) // chunk, 0)
            left = int(torch.randint(0, max_left + 1, (), generator=generator).item())
        return chunk, left
    if training and static_chunk_size > 0:
        return static_chunk_size, -1
    if not training and decoding_chunk_size > 0:
        return decoding_chunk_size, num_decoding_left_chunks
    if not training and static_chunk_size > 0 and decoding_chunk_size == 0:
        return static_chunk_size, num_decoding_left_chunks
    return 0, -1


def attention_mask(pad_valid: torch.Tensor, chunk_size: int, num_left_chunks: int) -> torch.Tensor:
    """[B, T, T] self-attention mask from [B, T] valid frames and a chunk choice."""
    keys = pad_valid.unsqueeze(1)  # [B, 1, T]
    if chunk_size <= 0:
        return keys.expand(-1, pad_valid.size(1), -1)
    chunk = subsequent_chunk_mask(pad_valid.size(1), chunk_size, num_left_chunks, pad_valid.device)
    return keys & chunk.unsqueeze(0)

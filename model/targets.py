"""Decoder inputs and outputs built from padded token targets."""
from __future__ import annotations

import torch

from .label_smoothing import IGNORE_ID


def add_sos_eos(ys: torch.Tensor, ys_lens: torch.Tensor, sos: int, eos: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] padded with IGNORE_ID -> decoder input (<sos> y, padded with eos) and output (y <eos>)."""
    b, length = ys.shape
    pos = torch.arange(length + 1, device=ys.device).unsqueeze(0)
    body = torch.cat([ys, ys.new_full((b, 1), IGNORE_ID)], dim=1)
    ys_out = torch.where(pos == ys_lens.unsqueeze(1), torch.full_like(body, eos), body)
    ys_in = torch.cat([ys.new_full((b, 1), sos), ys.masked_fill(ys == IGNORE_ID, eos)], dim=1)
    return ys_in, ys_out


def reverse_padded(ys: torch.Tensor, ys_lens: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ys_lens[i] tokens, keeping the padding at the end."""
    length = ys.size(1)
    pos = torch.arange(length, device=ys.device).unsqueeze(0)
    src = (ys_lens.unsqueeze(1) - 1 - pos).clamp(min=0)
    rev = ys.gather(1, src)
    return torch.where(pos < ys_lens.unsqueeze(1), rev, ys)

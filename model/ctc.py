"""CTC head: a linear projection to the units and the CTC loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CTC(nn.Module):
    def __init__(self, vocab_size: int, dim: int, blank_id: int = 0):
        super().__init__()
        self.ctc_lo = nn.Linear(dim, vocab_size)
        self.blank_id = blank_id

    def log_softmax(self, hs: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.ctc_lo(hs).float(), dim=-1)

    def forward(self, hs: torch.Tensor, hs_lens: torch.Tensor, ys: torch.Tensor,
                ys_lens: torch.Tensor) -> torch.Tensor:
        """Summed CTC loss divided by the batch size (WeNet's normalisation)."""
        log_probs = self.log_softmax(hs).transpose(0, 1)  # [T, B, V]
        loss = F.ctc_loss(log_probs, ys.clamp(min=0), hs_lens, ys_lens, blank=self.blank_id,
                          reduction="sum", zero_infinity=True)
        return loss / hs.size(0)

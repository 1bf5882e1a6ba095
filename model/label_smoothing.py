"""Label-smoothed cross entropy for the attention decoders (KL to the smoothed target)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_ID = -1


class LabelSmoothingLoss(nn.Module):
    def __init__(self, vocab_size: int, smoothing: float, normalize_length: bool):
        super().__init__()
        self.vocab_size = vocab_size
        self.confidence = 1.0 - smoothing
        self.smoothing = smoothing
        self.normalize_length = normalize_length

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, L, V], target [B, L] padded with IGNORE_ID.

        Normalised by the token count when `normalize_length`, else by the batch size.
        """
        batch_size = logits.size(0)
        logits = logits.reshape(-1, self.vocab_size).float()
        target = target.reshape(-1)
        keep = target != IGNORE_ID
        true_dist = torch.full_like(logits, self.smoothing / (self.vocab_size - 1))
        true_dist.scatter_(1, target.clamp(min=0).unsqueeze(1), self.confidence)
        kl = F.kl_div(F.log_softmax(logits, dim=1), true_dist, reduction="none").sum(dim=1)
        total = kl.masked_fill(~keep, 0.0).sum()
        denom = keep.sum().clamp(min=1) if self.normalize_length else batch_size
        return total / denom

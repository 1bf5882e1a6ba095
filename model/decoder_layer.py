"""One Transformer decoder block: causal self-attention, cross-attention, feed-forward (pre-norm)."""
from __future__ import annotations

import torch
from torch import nn

from u2moe.model.attention import MultiHeadedAttention
from u2moe.model.config import DecoderConfig
from u2moe.model.feed_forward import build_feed_forward


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = MultiHeadedAttention(cfg.attention_heads, dim, cfg.self_attention_dropout_rate)
        self.src_attn = MultiHeadedAttention(cfg.attention_heads, dim, cfg.src_attention_dropout_rate)
        self.feed_forward = build_feed_forward(dim, cfg.ffn)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, tgt: torch.Tensor, tgt_mask: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor, tgt_valid: torch.Tensor | None) -> torch.Tensor:
        """tgt [B, L, D], tgt_mask [B, L, L], memory [B, T, D], memory_mask [B, 1, T], tgt_valid [B, L]."""
        h = self.norm1(tgt)
        x = tgt + self.dropout(self.self_attn(h, h, h, tgt_mask)[0])
        h = self.norm2(x)
        x = x + self.dropout(self.src_attn(h, memory, memory, memory_mask)[0])
        return x + self.dropout(self.feed_forward(self.norm3(x), tgt_valid))

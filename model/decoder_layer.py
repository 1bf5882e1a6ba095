"""One Transformer decoder block: causal self-attention, cross-attention, feed-forward (pre-norm)."""
from __future__ import annotations

import torch
from torch import nn

from ..configs.model import DecoderConfig
from .attention import MultiHeadedAttention
from .feed_forward import build_feed_forward


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

    def forward(self, tgt: torch.Tensor, tgt_mask: torch.Tensor, memory: torch.Tensor | None,
                memory_mask: torch.Tensor, tgt_valid: torch.Tensor | None,
                memory_kv: torch.Tensor | None = None, real_frames: torch.Tensor | None = None) -> torch.Tensor:
        """tgt [B, L, D], tgt_mask [B, L, L], memory [B, T, D], memory_mask [B, 1, T] (True = may
        attend, or both as `attention.additive_mask` makes them), tgt_valid [B, L]. memory_kv:
        memory's keys and values from `src_attn.project_key_value`, given instead of memory.
        real_frames: tgt_valid's flat positions, for an MoE feed-forward (`stack_real_frames`)."""
        h = self.norm1(tgt)
        x = tgt + self.dropout(self.self_attn(h, h, h, tgt_mask)[0])
        h = self.norm2(x)
        if memory_kv is not None:
            x = x + self.dropout(self.src_attn.attend_projected(h, memory_kv, memory_mask))
        else:
            assert memory is not None, "a decoder layer needs memory or its projected memory_kv"
            x = x + self.dropout(self.src_attn(h, memory, memory, memory_mask)[0])
        return x + self.dropout(self.feed_forward(self.norm3(x), tgt_valid, real_frames))

    @torch.jit.unused  # incremental decoding is Python-side search, not part of the exported graph
    def forward_step(self, x: torch.Tensor, self_cache: torch.Tensor | None, memory_kv: torch.Tensor,
                     memory_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference for the newest position only: x [B, 1, D]; self_cache [B, H, L-1, 2*d_k], the
        earlier positions' self-attention keys and values (None at the first); memory_kv from
        `src_attn.project_key_value`. -> (output [B, 1, D], self_cache with this position).
        Equals `forward` on the whole prefix, at its last position (dropout off)."""
        h = self.norm1(x)
        # One column per key, not one broadcast: CUDA's memory-efficient attention refuses a bias
        # whose last dimension has stride 0.
        keys = 1 + (self_cache.size(2) if self_cache is not None else 0)
        every_earlier = torch.ones(x.size(0), 1, keys, dtype=torch.bool, device=x.device)
        attn, self_cache = self.self_attn(h, h, h, every_earlier, self_cache)
        x = x + attn
        x = x + self.src_attn.attend_projected(self.norm2(x), memory_kv, memory_mask)
        return x + self.feed_forward(self.norm3(x), None), self_cache

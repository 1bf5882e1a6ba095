"""One Conformer block: half FFN, self-attention, convolution, half FFN (pre-norm, macaron)."""
from __future__ import annotations

import torch
from torch import nn

from ..configs.model import EncoderConfig
from .attention import RelPositionMultiHeadedAttention
from .convolution import ConvolutionModule
from .feed_forward import build_feed_forward


class ConformerEncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        dim = cfg.output_size
        self.self_attn = RelPositionMultiHeadedAttention(cfg.attention_heads, dim, cfg.attention_dropout_rate)
        self.feed_forward_macaron = build_feed_forward(dim, cfg.ffn) if cfg.macaron_style else None
        self.feed_forward = build_feed_forward(dim, cfg.ffn)
        self.conv_module = ConvolutionModule(dim, cfg.cnn_module_kernel, cfg.causal, cfg.cnn_module_norm)
        self.norm_ff_macaron = nn.LayerNorm(dim) if cfg.macaron_style else None
        self.norm_mha = nn.LayerNorm(dim)
        self.norm_conv = nn.LayerNorm(dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.norm_final = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.ff_scale = 0.5 if cfg.macaron_style else 1.0

    def forward(self, x: torch.Tensor, att_mask: torch.Tensor, pos_emb: torch.Tensor,
                valid: torch.Tensor | None, att_cache: torch.Tensor | None = None,
                cnn_cache: torch.Tensor | None = None, real_frames: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D]; att_mask [B, T, T_cache+T]; valid [B, T] real frames (None: all real);
        real_frames: their flat positions, for the MoE feed-forwards (`stack_real_frames`).

        Returns the output and the new attention and convolution caches.
        """
        if self.feed_forward_macaron is not None:
            x = x + self.ff_scale * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(x), valid, real_frames))
        h = self.norm_mha(x)
        h, new_att_cache = self.self_attn(h, h, h, att_mask, pos_emb, att_cache)
        x = x + self.dropout(h)
        h, new_cnn_cache = self.conv_module(self.norm_conv(x), valid, cnn_cache)
        x = x + self.dropout(h)
        x = x + self.ff_scale * self.dropout(self.feed_forward(self.norm_ff(x), valid, real_frames))
        return self.norm_final(x), new_att_cache, new_cnn_cache

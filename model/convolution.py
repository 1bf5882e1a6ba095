"""Conformer convolution module: pointwise -> GLU -> depthwise -> norm -> swish -> pointwise."""
from __future__ import annotations

import torch
from torch import nn


class ConvolutionModule(nn.Module):
    def __init__(self, channels: int, kernel_size: int, causal: bool, norm: str):
        super().__init__()
        self.causal = causal
        # A causal depthwise convolution looks only at the past: kernel-1 frames of left context,
        # which streaming keeps as a cache between chunks.
        self.lorder = kernel_size - 1 if causal else 0
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.depthwise_conv = nn.Conv1d(
            channels, channels, kernel_size, padding=0 if causal else (kernel_size - 1) // 2,
            groups=channels,
        )
        self.use_layer_norm = norm == "layer_norm"
        self.norm = nn.LayerNorm(channels) if self.use_layer_norm else nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)
        self.activation = nn.SiLU()

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C]; valid [B, T]; cache [B, C, lorder] of earlier inputs (causal only).

        Returns the output and the new cache (empty for a non-causal module).
        """
        x = x.transpose(1, 2)  # [B, C, T]
        padded = None if valid is None else ~valid.unsqueeze(1)  # once for both fills
        if padded is not None:
            # Padded frames must not leak into real ones through the kernel.
            x = x.masked_fill(padded, 0.0)
        if self.lorder > 0:
            if cache is None or cache.size(2) == 0:
                x = nn.functional.pad(x, (self.lorder, 0))
            else:
                x = torch.cat([cache.to(x.dtype), x], dim=2)
            new_cache = x[:, :, -self.lorder:]
        else:
            new_cache = x.new_zeros(x.size(0), x.size(1), 0)
        x = nn.functional.glu(self.pointwise_conv1(x), dim=1)
        if padded is not None and self.lorder == 0:
            # A centred kernel reads the frames after an utterance's end, which the pointwise
            # convolution's bias has made nonzero: zero them again, so that a padded utterance's
            # real frames see what they would see alone (a causal kernel never reads them).
            x = x.masked_fill(padded, 0.0)
        x = self.depthwise_conv(x)
        if self.use_layer_norm:
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.norm(x)
        x = self.pointwise_conv2(self.activation(x))
        if padded is not None:
            x = x.masked_fill(padded, 0.0)
        return x.transpose(1, 2), new_cache

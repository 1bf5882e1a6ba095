"""Conv2d front-end: 4x, 6x or 8x time reduction of fbank frames before the Conformer."""
from __future__ import annotations

import torch
from torch import nn

# (kernel, stride) of each Conv2d layer, per subsampling rate.
_LAYERS = {4: [(3, 2), (3, 2)], 6: [(3, 2), (5, 3)], 8: [(3, 2), (3, 2), (3, 2)]}


class Conv2dSubsampling(nn.Module):
    def __init__(self, idim: int, odim: int, rate: int, conv_channels: int = 0):
        super().__init__()
        conv_channels = conv_channels or odim
        layers: list[nn.Module] = []
        freq, channels = idim, 1
        for kernel, stride in _LAYERS[rate]:
            layers += [nn.Conv2d(channels, conv_channels, kernel, stride), nn.ReLU()]
            freq, channels = (freq - kernel) // stride + 1, conv_channels
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(conv_channels * freq, odim)
        self.layers = _LAYERS[rate]
        self.subsampling_rate = rate
        # Input frames the first output frame depends on beyond its own stride: the look-ahead
        # a streaming front-end must buffer (6, 10 and 14 frames for 4x, 6x and 8x).
        self.right_context = sum((k - 1) * self._stride_before(i) for i, (k, _) in enumerate(self.layers))

    def _stride_before(self, i: int) -> int:
        total = 1
        for _, stride in self.layers[:i]:
            total *= stride
        return total

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for kernel, stride in self.layers:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, idim] -> [B, T', odim]."""
        x = self.conv(x.unsqueeze(1))
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f))

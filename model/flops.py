"""Model FLOPs of one utterance: what model-FLOPs utilisation (MFU) divides by a GPU's peak.

Counted as torch.utils.flop_counter does (2 per multiply-add, matrix products and convolutions
only; tests/test_flops.py checks the forward against it): the forward pass of the training loss
for an utterance of `frames` fbank frames and `tokens` target units, both decoders and the CTC
head included. A training step costs 3 forwards (the backward pass is two: gradients of inputs
and of weights), the convention of MFU figures elsewhere. MoE layers count the router and the
`top_k` experts each frame passes through; padded frames are not counted (they are not useful
work), so a padded batch's FLOPs are the sum over its utterances.
"""
from __future__ import annotations

from ..configs.model import FeedForwardConfig, ModelConfig
from .subsampling import _LAYERS


def _linear(n_in: int, n_out: int, rows: int) -> int:
    return 2 * n_in * n_out * rows


def _feed_forward(dim: int, cfg: FeedForwardConfig, rows: int) -> int:
    one = _linear(dim, cfg.hidden_units, rows) + _linear(cfg.hidden_units, dim, rows)
    if cfg.type == "dense":
        return one
    return _linear(dim, cfg.num_experts, rows) + cfg.top_k * one


def subsampled_frames(cfg: ModelConfig, frames: int) -> int:
    for kernel, stride in _LAYERS[cfg.encoder.subsampling]:
        frames = (frames - kernel) // stride + 1
    return frames


def encoder_flops(cfg: ModelConfig, frames: int) -> int:
    enc, d = cfg.encoder, cfg.encoder.output_size
    flops, t, f, channels = 0, frames, enc.input_size, 1
    conv_channels = enc.subsampling_channels or d
    for kernel, stride in _LAYERS[enc.subsampling]:
        t, f = (t - kernel) // stride + 1, (f - kernel) // stride + 1
        flops += 2 * channels * kernel * kernel * conv_channels * t * f
        channels = conv_channels
    flops += _linear(conv_channels * f, d, t)
    ffns = 2 if enc.macaron_style else 1
    block = ffns * _feed_forward(d, enc.ffn, t)
    # Relative-position attention: q, k, v, out; the position projection of 2t - 1 distances;
    # content scores, position scores (t x (2t - 1)) and the weighted sum.
    block += 4 * _linear(d, d, t) + _linear(d, d, 2 * t - 1)
    block += 2 * t * t * d + 2 * t * (2 * t - 1) * d + 2 * t * t * d
    # Convolution module: pointwise d -> 2d (GLU; causal: over the K - 1 left-padding frames
    # too, as the streaming cache needs), depthwise kernel K, pointwise d -> d.
    left_pad = enc.cnn_module_kernel - 1 if enc.causal else 0
    block += _linear(d, 2 * d, t + left_pad) + 2 * d * enc.cnn_module_kernel * t + _linear(d, d, t)
    return flops + enc.num_blocks * block


def decoder_flops(cfg: ModelConfig, t: int, tokens: int) -> int:
    """Both decoders on `tokens` + 1 inputs (<sos> first) over `t` subsampled encoder frames."""
    dec, d, n = cfg.decoder, cfg.encoder.output_size, tokens + 1
    layer = 4 * _linear(d, d, n) + 2 * 2 * n * n * d  # self-attention
    layer += 2 * _linear(d, d, n) + 2 * _linear(d, d, t) + 2 * 2 * n * t * d  # attention over the encoder
    layer += _feed_forward(d, dec.ffn, n)
    per_decoder = _linear(d, cfg.vocab_size, n)
    return sum(blocks * layer + per_decoder for blocks in (dec.num_blocks, dec.r_num_blocks) if blocks)


def forward_flops(cfg: ModelConfig, frames: int, tokens: int) -> int:
    t = subsampled_frames(cfg, frames)
    return encoder_flops(cfg, frames) + _linear(cfg.encoder.output_size, cfg.vocab_size, t) \
        + decoder_flops(cfg, t, tokens)


def training_flops(cfg: ModelConfig, frames: list[int], tokens: list[int]) -> int:
    """FLOPs of a training step on a batch (forward + backward = 3 forwards)."""
    return 3 * sum(forward_flops(cfg, f, n) for f, n in zip(frames, tokens))


# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity; fp32 accumulation on
# the GeForce cards), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "RTX 4090": 165.2, "RTX 3090": 71.0, "A10": 125.0, "L40S": 362.0}


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in device_name:
            return peak
    return None

"""Multi-head attention, plain (decoder) and with relative positions (Conformer encoder).

Both run on `scaled_dot_product_attention` so that fused kernels apply on GPUs; masks use the
project's convention (True = may attend) and become an additive bias with a finite floor, so a
query row with nothing to attend (a padded frame) yields finite values instead of NaN.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn


def _dtype_min(dtype: torch.dtype) -> float:
    """torch.finfo(dtype).min, written out: TorchScript has no torch.finfo."""
    if dtype == torch.float16:
        return -65504.0
    if dtype == torch.bfloat16:
        return -3.3895313892515355e38
    if dtype == torch.float64:
        return -1.7976931348623157e308
    return -3.4028234663852886e38


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mask [B, Tq|1, Tk] (True = may attend) as the additive bias [B, 1, Tq|1, Tk] that
    attention takes: 0 where allowed, the dtype's minimum elsewhere. The attention layers accept
    it in place of the mask: layers that share a mask (a decoder's) make it once, not three
    operators each."""
    keep = mask.unsqueeze(1)  # broadcast over heads
    # masked_fill with a Python scalar: a device tensor made from the scalar would be a
    # host-to-device copy (and a stall) per attention layer.
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, _dtype_min(dtype))


def _additive_bias(mask: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    if mask.is_floating_point():  # already additive (additive_mask): the decoder's layers
        # Adding it to a position bias could reach -inf, and a row of -inf gives NaN.
        assert bias is None, "an additive mask does not combine with a position bias; pass the bool mask"
        return mask
    if bias is None:
        return additive_mask(mask, dtype)
    return bias.masked_fill(~mask.unsqueeze(1), _dtype_min(bias.dtype))  # under autocast: bias's dtype


def avoid_per_shape_attention_plans() -> None:
    """Take cuDNN's attention kernels out of `scaled_dot_product_attention` for this process.

    cuDNN builds an execution plan for every new input shape, and speech brings a new shape
    almost every call (each dynamic batch, each streaming chunk with its growing cache), so
    planning would dominate the step; the memory-efficient and flash kernels that PyTorch picks
    instead need no plan. U2MOE_CUDNN_ATTENTION=1 keeps cuDNN's (for comparisons).
    Process-wide: torch offers no per-module switch short of a context manager around every call.
    """
    if os.environ.get("U2MOE_CUDNN_ATTENTION") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)


class MultiHeadedAttention(nn.Module):
    def __init__(self, num_heads: int, dim: int, dropout_rate: float):
        super().__init__()
        self.num_heads = num_heads
        self.d_k = dim // num_heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.dropout_rate = dropout_rate

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1, self.num_heads, self.d_k).transpose(1, 2)

    def _joint_projection(self, x: torch.Tensor, with_query: bool) -> list[torch.Tensor]:
        """Heads of (q,) k, v of one input as one matrix product, in training: a host-bound step
        pays per launch, and three products (each with its casts, forward and backward) cost
        three. Not in inference, where copying the weights together every call would double the
        weight traffic that a batch-1 decoder is bound by."""
        layers = [self.linear_q, self.linear_k, self.linear_v] if with_query else [self.linear_k, self.linear_v]
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
        return [self._heads(part) for part in F.linear(x, weight, bias).chunk(len(layers), dim=-1)]

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads of q, k, v; the cache [B, H, Tc, 2*d_k] holds earlier keys and values."""
        if self.training and query is key and key is value:  # self-attention
            q, k, v = self._joint_projection(query, True)
        else:
            q = self._heads(self.linear_q(query))
            if self.training and key is value:  # attention over a memory
                k, v = self._joint_projection(key, False)
            else:
                k, v = self._heads(self.linear_k(key)), self._heads(self.linear_v(value))
        if cache is not None and cache.size(2) > 0:
            k_cache, v_cache = cache.split(self.d_k, dim=-1)
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
        if self.training and cache is None:
            # A whole-utterance training forward never reads a new cache: an empty one, no copy
            # (a launch per attention layer in a host-bound step).
            return q, k, v, k[..., :0]
        return q, k, v, torch.cat([k, v], dim=-1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=_additive_bias(mask, q.dtype, bias),
            dropout_p=self.dropout_rate if self.training else 0.0,
        )
        # contiguous(): the ONNX exporters cannot reshape SDPA's transposed output in place.
        out = out.transpose(1, 2).contiguous().reshape(q.size(0), -1, self.num_heads * self.d_k)
        return self.linear_out(out)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mask: [B, Tq, Tk] or [B, 1, Tk], True where attention is allowed, or the same as
        `additive_mask` made it, in the dtype the attention runs in."""
        q, k, v, new_cache = self._project(query, key, value, cache)
        return self._attend(q, k, v, mask), new_cache

    def project_key_value(self, x: torch.Tensor) -> torch.Tensor:
        """Keys and values of x [B, T, D] as [B, H, T, 2*d_k], the layout of `cache`: attention
        over a fixed memory (the decoder's encoder output) projects it once, not every step."""
        return torch.cat([self._heads(self.linear_k(x)), self._heads(self.linear_v(x))], dim=-1)

    def attend_projected(self, query: torch.Tensor, key_value: torch.Tensor, mask: torch.Tensor
                         ) -> torch.Tensor:
        """Attention of query [B, Tq, D] over keys and values from `project_key_value`, of B
        memories or of one shared by the whole batch."""
        k, v = key_value.expand(query.size(0), -1, -1, -1).split(self.d_k, dim=-1)
        return self._attend(self._heads(self.linear_q(query)), k, v, mask)


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Transformer-XL attention: content term (q + u)k^T plus position term (q + v)R^T.

    `pos_emb` encodes the distances num_keys-1 ... -(num_queries-1) (see RelPositionalEncoding);
    the position term is computed once per distance and shifted onto (query, key) pairs.
    """

    def __init__(self, num_heads: int, dim: int, dropout_rate: float):
        super().__init__(num_heads, dim, dropout_rate)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    @staticmethod
    def rel_shift(scores: torch.Tensor, num_keys: int) -> torch.Tensor:
        """[B, H, Tq, Tk+Tq-1] per distance -> [B, H, Tq, Tk] per key: out[i, j] = in[i, Tq-1-i+j]."""
        scores = scores.contiguous()
        b, h, tq, p = scores.shape
        return scores.as_strided(
            (b, h, tq, num_keys), (h * tq * p, tq * p, p - 1, 1),
            storage_offset=scores.storage_offset() + tq - 1,
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                pos_emb: torch.Tensor | None = None, cache: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        assert pos_emb is not None, "relative-position attention needs pos_emb"
        q, k, v, new_cache = self._project(query, key, value, cache)
        pos = self._heads(self.linear_pos(pos_emb))  # [1, H, Tk+Tq-1, d_k]
        bias = torch.matmul(q + self.pos_bias_v.unsqueeze(1), pos.transpose(-2, -1))
        bias = self.rel_shift(bias, k.size(2)) / math.sqrt(self.d_k)
        return self._attend(q + self.pos_bias_u.unsqueeze(1), k, v, mask, bias), new_cache

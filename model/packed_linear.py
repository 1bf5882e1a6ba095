"""CPU decoding: linear layers' weights packed once into oneDNN's blocked layout.

A plain CPU product reorders its weight into the library's blocked layout on every call. With
few rows, as at batch 1 (a 16-frame chunk; an expert's share of one, about 4 frames at top-2 of
8; a beam step's 10 hypotheses), that reordering costs as much as the product itself: packed
once, each call reads the weight once, in the layout the kernel wants. Used by the feed-forward
blocks, dense and MoE alike, under `torch.inference_mode` only (decoding, where weights do not
change between calls and no gradient is needed).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# oneDNN's row-count hint for the packed layout (any row count works with it): it picks the
# kernel, and in fp32 a large hint's is faster even for a few rows.
ROWS_HINT = 256


def packing_applies(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `module` (a feed-forward block) runs x on packed weights of `dtype`: decoding
    (inference mode, eval mode) on a CPU where oneDNN runs that dtype (bf16 needs the CPU's
    bf16 instructions)."""
    if module.training or not torch.is_inference_mode_enabled() or x.device.type != "cpu":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, in] @ weight^T + bias, weight [out, in] as `PackedWeights` packed it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedWeights:
    """Packed copies of some [out, in] weights in one dtype, made from a module's parameters and
    made again when any of them changed (in place, as an optimizer step does, or replaced, as
    `module.to` does) or the dtype did. Derived state: copies and pickles carry none of it."""

    def __init__(self) -> None:
        self.source: tuple | None = None
        self.weights: list[torch.Tensor] = []

    def get(self, params: tuple[torch.Tensor, ...], dtype: torch.dtype,
            linear_weights: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The packed `linear_weights()` ([out, in] each, from `params`) in `dtype`."""
        # Parameters made under inference mode keep no version counter: their storage alone.
        source = (dtype,) + tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in params)
        if source != self.source:
            self.weights = [torch.ops.mkldnn._reorder_linear_weight(w.to(dtype).contiguous(), ROWS_HINT)
                            for w in linear_weights()]
            self.source = source
        return self.weights

    def __getstate__(self) -> dict:
        return {"source": None, "weights": []}

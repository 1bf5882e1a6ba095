"""Mixture-of-Experts feed-forward, split as in Megatron-Core: router -> token dispatcher -> experts.

- `router.TopKRouter`: bias-free linear gate, top-k of the logits, softmax over the selected ones (fp32).
- `dispatcher.SortedTokenDispatcher`: groups routed frames by expert and combines the results
  (on CUDA its gathers and weighted sums are the single-pass kernels of `triton_permute`).
- `all_to_all_dispatcher.AllToAllTokenDispatcher`: the same across expert-parallel ranks.
- `experts.GroupedExperts`: all experts' weights as stacked tensors, run over contiguous groups
  by one of the `backends` (per-expert loop, `torch._grouped_mm`, `triton_grouped_gemm`); when
  decoding on a CPU, on weights packed once (`..packed_linear`) through `forward_packed`.
- `layer.MoEFeedForward`: the drop-in replacement for a dense FFN, padding-aware.
- `parallel`: expert parallelism under DeepSpeed ZeRO-1/2, and checkpoint layout conversion.
"""
from .layer import MoEFeedForward

__all__ = ["MoEFeedForward"]

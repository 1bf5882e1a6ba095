"""Mixture-of-Experts feed-forward, split as in Megatron-Core: router -> token dispatcher -> experts.

- `router.TopKRouter`: bias-free linear gate, top-k of the logits, softmax over the selected ones (fp32).
- `dispatcher.SortedTokenDispatcher`: groups routed frames by expert and combines the results.
- `experts.GroupedExperts`: all experts' weights as stacked tensors, run over contiguous groups.
- `layer.MoEFeedForward`: the drop-in replacement for a dense FFN, padding-aware.
"""
from u2moe.model.moe.layer import MoEFeedForward

__all__ = ["MoEFeedForward"]

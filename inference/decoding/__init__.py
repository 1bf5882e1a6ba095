"""Decoding: CTC greedy, CTC prefix beam search, attention beam search, attention rescoring.

Entry points: `search.decode_batch` (a batch of features, any modes) and `command` (`u2moe decode`).
"""

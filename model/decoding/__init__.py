"""Decoding: CTC greedy, CTC prefix beam search, attention beam search, attention rescoring.

Entry points: `search.decode_batch` (a batch of features, any modes), `command` (`u2moe decode`),
`rtf` (`u2moe bench rtf`). Submodules are imported on use, so the CLI stays fast to start.
"""

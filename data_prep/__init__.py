"""Data side of the trainer: Kaldi dirs -> tar shards, units, CMVN, and the batch pipeline.

Importing this package is cheap; the public names load their modules on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "DataPrepError": "errors",
    "DataStats": "stats",
    "FeatureExtractor": "feature_extractor",
    "Tokenizer": "tokenizer",
    "build_dataloader": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

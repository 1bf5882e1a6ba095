"""Data side of the trainer: Kaldi dirs -> tar shards, units, CMVN, and the batch pipeline."""
from ..configs.data import DataConfig
from .errors import DataPrepError
from .feature_extractor import FeatureExtractor
from .pipeline import build_dataloader
from .stats import DataStats
from .tokenizer import Tokenizer

__all__ = ["DataConfig", "DataPrepError", "DataStats", "FeatureExtractor", "Tokenizer", "build_dataloader"]

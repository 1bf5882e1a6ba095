"""The model's output size from the units directory it is trained on.

The presets carry a placeholder `model.vocab_size`: the real size is the units table's, known only
once `u2moe prep units` has run. It is taken from there unless the user chose a size (a `--set`
or a config file of their own); only a size the user chose that differs is an error.
"""
from __future__ import annotations

from pathlib import Path

from ..configs.experiment import PRESET_DIR, ExperimentConfig, load_config, resolve_config_path
from ..configs.loading import ConfigError, load_yaml
from ..data_prep.tokenizer import Tokenizer

KEY = "model.vocab_size"


def set_by_user(config: str | Path, overrides: list[str]) -> bool:
    """Whether `model.vocab_size` comes from the user rather than from a shipped preset."""
    if any(item.partition("=")[0].strip() == KEY for item in overrides):
        return True
    path = resolve_config_path(config)
    if path.resolve().parent == PRESET_DIR.resolve():
        return False
    return "vocab_size" in (load_yaml(path).get("model") or {})


def fit_vocab_size(cfg: ExperimentConfig, units_vocab: int, units_dir: str, user_set: bool) -> None:
    """Give `cfg` the units table's size, or refuse a size the user set that differs from it."""
    if cfg.model.vocab_size == units_vocab:
        return
    if user_set:
        raise ConfigError(f"{KEY} is {cfg.model.vocab_size}, but {units_dir} has {units_vocab} units; "
                          f"leave {KEY} unset to use {units_vocab}")
    cfg.model.vocab_size = units_vocab


def load_training_config(config: str | Path, overrides: list[str], units_dir: str) -> ExperimentConfig:
    """`load_config`, with `model.vocab_size` from the units directory as above."""
    cfg = load_config(config, overrides)
    fit_vocab_size(cfg, Tokenizer.load(units_dir).vocab_size, units_dir, set_by_user(config, overrides))
    return cfg

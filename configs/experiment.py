"""Experiment configuration: one yaml file, sections validated into dataclasses at load.

`--config NAME` takes a shipped preset (configs/presets/NAME.yaml), anything else is a path.
Overrides (`--set model.encoder.num_blocks=6`) apply to the fully resolved config, so every key
a user can override exists and is checked, and the saved config is complete on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data import DataConfig
from .loading import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from .model import ModelConfig
from .train import OptimConfig, TrainConfig

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset '{name_or_path}' (presets: {', '.join(preset_names())})")
    return preset


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    path = resolve_config_path(name_or_path)
    cfg = from_dict(ExperimentConfig, load_yaml(path), source=str(path))
    if overrides:
        cfg = from_dict(ExperimentConfig, apply_overrides(to_dict(cfg), list(overrides)),
                        source=f"{path} with --set")
    return cfg

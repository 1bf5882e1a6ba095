"""`u2moe export`: one consolidated fp32 `model.pt` from a run's checkpoints, optionally averaged
(the last N, or the N of lowest dev loss)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ..configs.experiment import ExperimentConfig
from ..configs.loading import ConfigError, from_dict
from ..data_prep.progress_bar import progress_bar
from ..data_prep.tokenizer import read_units
from ..inference.model_file import save_model_file
from ..model import U2Model
from .checkpoint import read_fp32_weights, usable_tags
from .val_best import best_tags, dev_losses


def average_weights(tag_dirs: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the checkpoints' fp32 weights (WeNet's average_model, in fp64)."""
    total: dict[str, torch.Tensor] = {}
    for tag_dir in progress_bar(tag_dirs, "export", len(tag_dirs), "checkpoint"):
        for name, value in read_fp32_weights(tag_dir).items():
            total[name] = total[name] + value.double() if name in total else value.double()
    return {name: (value / len(tag_dirs)).float() for name, value in total.items()}


def export_model(exp_dir: Path, out: Path, average: int = 1, tag: str | None = None,
                 val_best: bool = False) -> list[str]:
    """Write `out` from the `average` checkpoints of `exp_dir` up to `tag` (default: the newest):
    the last ones, or with `val_best` those of lowest dev loss; returns the tags used."""

    ckpt_root = exp_dir / "checkpoints"
    tags = usable_tags(ckpt_root)
    if not tags:
        raise ConfigError(f"{ckpt_root}: no complete checkpoint to export")
    if tag is not None:
        if tag not in tags:
            raise ConfigError(f"{ckpt_root}: no complete checkpoint '{tag}' (have: {', '.join(tags)})")
        tags = tags[:tags.index(tag) + 1]
    if average < 1 or average > len(tags):
        raise ConfigError(f"--average {average}: {ckpt_root} has {len(tags)} checkpoints to average")
    used = best_tags(tags, dev_losses(exp_dir), average, ckpt_root) if val_best else tags[-average:]
    cfg = from_dict(ExperimentConfig, yaml.safe_load((exp_dir / "train.yaml").read_text()),
                    source=str(exp_dir / "train.yaml"))
    units_dir = Path(json.loads((exp_dir / "paths.json").read_text())["units"])
    model = U2Model(cfg.model)
    model.load_state_dict(average_weights([ckpt_root / t for t in used]), strict=True)
    save_model_file(out, model, cfg, read_units(units_dir / "units.txt"))
    return used

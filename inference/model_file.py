"""The deployable model file (`model.pt`): config, full fp32 weights and units in one torch.save.

Format "u2moe-model-v1": {"format", "config": resolved experiment config as a dict, "state_dict":
every weight (all experts, CMVN buffers), "units": unit strings in id order}. One file is enough
to decode: the config rebuilds the architecture, the units turn ids into text.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..configs.experiment import ExperimentConfig
from ..configs.loading import ConfigError, from_dict, to_dict
from ..model.asr_model import U2Model

FORMAT = "u2moe-model-v1"


def save_model_file(path: str | Path, model: U2Model, experiment_config: Any,
                    units_lines: list[str]) -> None:
    """Write `model.pt`. experiment_config: an ExperimentConfig or its dict; units_lines: the unit
    strings in id order (a units.txt line `tok id` is reduced to `tok`)."""

    config = experiment_config if isinstance(experiment_config, dict) else to_dict(experiment_config)
    units = [line.split()[0] for line in units_lines if line.strip()]
    if len(units) != model.cfg.vocab_size:
        raise ValueError(f"{path}: {len(units)} units for a model with vocab_size={model.cfg.vocab_size}")
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "config": config, "state_dict": state, "units": units}, str(path))


def load_model_file(path: str | Path) -> tuple[U2Model, dict[str, Any], list[str]]:
    """(model in eval mode on CPU, experiment config dict, units); errors (ConfigError: the user's
    file) name the file and key."""

    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ConfigError(f"{path}: not a {FORMAT} model file (not a torch.save archive)")
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Its pickle names code to call: refused unread (torch's message spans lines).
        raise ConfigError(f"{path}: not a {FORMAT} model file: torch.load(weights_only=True) refused it") from err
    except (OSError, RuntimeError, EOFError) as err:
        raise ConfigError(f"{path}: cannot read model file ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ConfigError(f"{path}: not a {FORMAT} model file (format: {found!r})")
    for key in ("config", "state_dict", "units"):
        if key not in blob:
            raise ConfigError(f"{path}: missing key '{key}'")
    config = blob["config"]
    # Only the model section is needed to decode; other sections (trainer, data) may be newer.
    model_cfg = from_dict(ExperimentConfig, {"model": config.get("model", {})}, source=f"{path}:config").model
    units = list(blob["units"])
    if len(units) != model_cfg.vocab_size:
        raise ConfigError(f"{path}: 'units' has {len(units)} entries, config vocab_size={model_cfg.vocab_size}")
    model = U2Model(model_cfg)
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: 'state_dict' does not fit the config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.eval(), config, units

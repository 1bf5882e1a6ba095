"""Checkpoint files on disk: written under a temporary name and renamed once synced, read without
running code.

torch.save straight to the final name leaves a half-written file under that name when the process
dies, so every file here is written beside it and renamed when complete. torch.load without
weights_only unpickles arbitrary objects, so a file planted in a checkpoint folder would run code
on resume: every file here is read with weights_only (tensors, numbers, strings, containers) and
admits besides only DeepSpeed's few plain state classes listed below.
"""
from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..configs.loading import ConfigError

# What ZeRO's optimizer state files hold beyond plain data: the loss scaler's settings, the
# stage, the addresses of parameter fragments. Unpickled from their fields; none runs code then.
DEEPSPEED_STATE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def write_atomic(path: Path, write: Callable[[Path], None]) -> int:
    """`write(temporary path)`, then sync it and rename it to `path`: a reader sees the whole
    file or none. Returns its size in bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)
    return path.stat().st_size


def sync_dir(path: Path) -> None:
    """Make the directory's entries (a rename) durable, not only the files' contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allowed_classes(path: Path) -> list[type]:
    """The DeepSpeed state classes that unpickling `path` needs; refuses a file that names any
    other global (anything that could run code), without unpickling it."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise ConfigError(f"{path}: not a torch checkpoint file, not loaded ({_first_line(err)})") from err
    refused = [name for name in names if name not in DEEPSPEED_STATE_CLASSES]
    if refused:
        raise ConfigError(f"{path}: refused, not loaded: unpickling it would call {refused[0]} (checkpoint "
                          "files hold only tensors and plain data)")
    return [_resolve(name) for name in names]


def load_data(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only, admitting only the DeepSpeed state classes the file needs."""
    path = Path(path)
    with torch.serialization.safe_globals(allowed_classes(path)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ConfigError(f"{path}: refused by torch.load(weights_only=True), not loaded") from err
        except (OSError, RuntimeError, EOFError) as err:
            raise ConfigError(f"{path}: cannot read ({_first_line(err)})") from err


class CheckpointFiles:
    """DeepSpeed's checkpoint engine, with its files written atomically (and their sizes
    recorded for the checkpoint's manifest) and read through `load_data`; every other call goes
    to the engine it wraps, DeepSpeed's torch.save engine."""

    def __init__(self, inner: Any):
        if type(inner).__name__ != "TorchCheckpointEngine":
            raise ConfigError(f"DeepSpeed checkpoint engine {type(inner).__name__}: only DeepSpeed's default "
                              "(torch.save) engine is supported, whose files are complete when save returns")
        # torch's zip format, whatever the DeepSpeed config says: the only one whose globals
        # `allowed_classes` can list without unpickling the file.
        inner.zipfile_serialization = True
        self.inner = inner
        self.written: dict[str, int] = {}

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        self.written[path] = write_atomic(Path(path), lambda tmp: self.inner.save(state_dict, str(tmp)))

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_data(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _resolve(name: str) -> type:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__

"""Strict loading of nested dataclass configs from yaml/dicts.

A misspelt key is the most common way to lose a day of GPU time, so an unknown key is an error
that names the key path and the file it came from; values are type-checked against the field
annotations, and every dataclass may validate itself further in `__post_init__`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and its source."""


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {type(value).__name__}")
        return _build(annotation, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"'{where}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{where}': {value!r} fits none of {args}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{where}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 5e-4 as a string: it needs a dot (5.0e-4) to be a float.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"'{where}': unsupported annotation {annotation!r}")


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{_join(where, unknown[0])}' (known: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(value, hints[name], _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # __post_init__ checks, or a required field is missing
        raise ConfigError(f"invalid '{where or cls.__name__}': {err}") from None


def from_dict(cls: type[T], data: dict, source: str, prefix: str = "") -> T:
    """Build dataclass `cls` from `data` (found at key path `prefix` of `source`).

    Errors read like "conf.yaml: 'model.encoder.num_blocks' must be an integer, got 'six'".
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or 'top level'}' must be a mapping")
    try:
        return _build(cls, data, prefix)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def to_dict(obj: Any) -> dict:
    """Plain yaml-safe types: tuples become lists."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(obj))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read yaml ({err})") from err
    return data or {}


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `a.b.c=value` overrides (value parsed as yaml) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: expected key=value, got {item!r}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{source}: unknown key '{key}' ('{part}' is not a section)")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"{source}: unknown key '{key}'")
        node[parts[-1]] = yaml.safe_load(raw)
    return data

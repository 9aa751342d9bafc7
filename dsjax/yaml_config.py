"""YAML files in ``configs/`` fill :class:`~dsjax.config.ModelConfig`; they hold no logic of their own.

A file names a ``preset`` and/or lists fields under ``model``; unknown keys are errors::

    preset: deepseek_v3
    model:
      num_hidden_layers: 4
"""

from __future__ import annotations

import dataclasses
import enum
import os

import yaml

from dsjax.config import PRESETS, ConfigError, ModelConfig


def model_config_from_dict(d: dict) -> ModelConfig:
    """``{"preset": name, "model": {field: value}}`` -> ModelConfig (preset defaults, then the fields)."""
    unknown = set(d) - {"preset", "model"}
    if unknown:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)} (expected 'preset' and/or 'model')")
    fields = dict(d.get("model") or {})
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = set(fields) - names
    if bad:
        raise ConfigError(f"model: unknown fields {sorted(bad)}")
    preset = d.get("preset")
    if preset is None:
        return ModelConfig(**fields)
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    return PRESETS[preset](**fields)


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """Read a YAML model config (see the module docstring)."""
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return model_config_from_dict(d)


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """All fields as plain YAML-friendly values (enums as strings, YaRN as a mapping)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        return value.value if isinstance(value, enum.Enum) else value

    return {"model": {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}}

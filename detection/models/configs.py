"""Named model configs: configs/models/NAME.yaml files read into a DetrConfig.

The YAML holds DetrConfig fields; unknown fields are an error naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from detection.models.detr import DetrConfig
from detection.resources import data_path

CONFIG_DIR = data_path("configs", "models")


def available_configs() -> list[str]:
    """Names of the configs in configs/models/ (file stems)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | os.PathLike) -> DetrConfig:
    """A DetrConfig from a config name (configs/models/NAME.yaml) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"no model config {str(name_or_path)!r}: {path} does not exist; "
                         f"known configs: {available_configs()}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of DetrConfig fields")
    data.setdefault("name", path.stem)
    return DetrConfig.from_dict(data, origin=str(path))

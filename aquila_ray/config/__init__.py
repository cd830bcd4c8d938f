"""Typed configuration dataclasses and the preset registry."""

from aquila_ray.config.base import apply_overrides, from_dict, load_overlay, resolve, to_dict
from aquila_ray.config.model import ModelConfig, MoEConfig
from aquila_ray.config.presets import PRESETS, get_preset
from aquila_ray.config.train import TrainConfig, build_train_config

__all__ = [
    "PRESETS",
    "TrainConfig",
    "build_train_config",
    "ModelConfig",
    "MoEConfig",
    "apply_overrides",
    "from_dict",
    "get_preset",
    "load_overlay",
    "resolve",
    "to_dict",
]

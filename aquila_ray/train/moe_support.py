"""Where MoE plugs into the trainer: expert sharding over the expert-parallel group, expert parameter
groups, gathering experts for layout-independent checkpoints, and online upcycling.

Placeholder until ``aquila_ray.moe`` / ``aquila_ray.upcycle`` land: expert-parallel size 1 (every rank
holds every expert, plain data parallelism) works with any MoE layer; EP > 1 and online upcycling raise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aquila_ray.config.model import ModelConfig
from aquila_ray.config.train import TrainConfig
from aquila_ray.errors import ConfigError


def shard_experts(model: nn.Module, model_cfg: ModelConfig, dims: Any, ep: Any) -> None:
    if dims.ep > 1:
        raise ConfigError(f"ScalingOptions.expert_parallel={dims.ep} needs aquila_ray.moe's expert-parallel "
                          f"dispatcher, which is not available yet; use expert_parallel=1")


def split_moe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return groups


def local_expert_state(model: nn.Module, state: dict[str, torch.Tensor], dims: Any) -> dict[str, torch.Tensor]:
    return state


def gather_expert_tensors(model: nn.Module, sd: dict[str, torch.Tensor], dims: Any, ep: Any,
                          suffixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    return sd


def upcycled_state_dict(cfg: TrainConfig, model_cfg: ModelConfig, dims: Any) -> dict[str, torch.Tensor]:
    raise ConfigError("TrainConfig.init='upcycle' needs aquila_ray.upcycle, which is not available yet")

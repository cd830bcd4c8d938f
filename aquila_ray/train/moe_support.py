"""Where MoE plugs into the trainer (``aquila_ray.moe`` / ``aquila_ray.upcycle``): expert-parallel groups,
the rank's share of the experts (sharded from a seeded full build, sliced from a full state dict, or
upcycled online from a dense checkpoint), DeepSpeed expert parameter groups, and gathering every expert
back into layout-independent checkpoints (weights and Adam moments keyed by global expert id).

Imported only for MoE models, so dense runs never load the MoE package.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aquila_ray.config.model import ModelConfig
from aquila_ray.config.train import TrainConfig
from aquila_ray.model import Aquila3, build_model
from aquila_ray.moe.parallel import (
    ExpertParallelGroups,
    create_expert_parallel_groups,
    local_expert_state,
    mark_expert_params,
    register_with_deepspeed,
    shard_experts,  # re-exported for the resume path (engine.build_worker_model)
    split_moe_param_groups,
)

_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts\.)(\d+)(\..+)\Z")


def create_groups(ep_size: int) -> ExpertParallelGroups:
    """Every EP and expert-data-parallel group (collective, same order on every rank)."""
    return create_expert_parallel_groups(ep_size)


def build_moe_model(cfg: TrainConfig, model_cfg: ModelConfig, groups: ExpertParallelGroups,
                    state_dict: dict[str, torch.Tensor] | None) -> Aquila3:
    """This rank's MoE model. ``state_dict`` (full, every expert) wins; else init=upcycle builds the local
    experts online from the dense checkpoint; else a seeded full model is built and sharded, so every
    expert-parallel size starts from the same weights."""
    if state_dict is None and cfg.init == "upcycle":
        from aquila_ray.upcycle.online import build_upcycled_model
        from aquila_ray.upcycle.upcycle import UpcycleOptions

        return build_upcycled_model(cfg.init_from, model_cfg, groups.ep,  # type: ignore[arg-type]
                                    UpcycleOptions(seed=cfg.seed)).float()
    model = build_model(model_cfg, seed=cfg.seed if state_dict is None else None)
    shard_experts(model, groups.ep)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(local_expert_state(model, state_dict), strict=False)
        missing = [k for k in missing if not (model_cfg.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"MoE state dict does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    return model


def moe_param_groups(model: nn.Module, groups: list[dict[str, Any]],
                     ep_groups: ExpertParallelGroups) -> list[dict[str, Any]]:
    """Expert parameters split into their own optimizer groups (DeepSpeed reduces them over the
    expert-data-parallel group); the model is registered with DeepSpeed as MoE. EP size 1 needs neither:
    experts are then ordinary replicated parameters."""
    if ep_groups.ep.size == 1:
        return groups
    mark_expert_params(model, ep_groups.group_name)
    register_with_deepspeed(model, ep_groups)
    return split_moe_param_groups(groups)


def gather_expert_tensor(name: str, tensor: torch.Tensor, groups: ExpertParallelGroups, num_experts: int
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for a non-expert tensor; for this rank's expert tensor, the same tensor of every expert
    at its position in the other ranks of the EP group (all-gathered over it, renamed to global expert ids).
    Collective over the EP group: its ranks walk their state dicts in the same (layer, local index, tensor)
    order, so the i-th call on each rank meets the same local expert slot."""
    m = _EXPERT_KEY.match(name)
    ep = groups.ep
    if m is None or ep.size == 1:
        yield name, tensor
        return
    num_local = len(ep.local_experts(num_experts))
    local = int(m.group(2)) - ep.rank * num_local
    gathered = [torch.empty_like(tensor) for _ in range(ep.size)]
    dist.all_gather(gathered, tensor.contiguous(), group=ep.group)
    for r, part in enumerate(gathered):
        yield f"{m.group(1)}{r * num_local + local}{m.group(3)}", part

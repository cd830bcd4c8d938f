"""Where MoE plugs into the trainer (``aquila_ray.moe`` / ``aquila_ray.upcycle``): expert-parallel groups,
the rank's share of the experts (sharded from a seeded full build, sliced from a full state dict, or
upcycled online from a dense checkpoint), DeepSpeed expert parameter groups, and gathering every expert
back into layout-independent checkpoints (weights and Adam moments keyed by global expert id).

Imported only for MoE models, so dense runs never load the MoE package.
"""

from __future__ import annotations

import re
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
    moe_layers,
    register_with_deepspeed,
    shard_experts,
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


def _split_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, int, str] | None:
    """(prefix up to the expert id, global expert id, rest incl. suffix) for expert tensors, else None."""
    for suffix in suffixes:
        if not key.endswith(suffix):
            continue
        m = _EXPERT_KEY.match(key[: len(key) - len(suffix)])
        if m is not None:
            return m.group(1), int(m.group(2)), m.group(3) + suffix
    return None


def gather_experts(model: nn.Module, tensors: dict[str, torch.Tensor], groups: ExpertParallelGroups,
                   suffixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """Replace this rank's expert tensors by every expert's (all-gathered over the EP group, renamed to
    global expert ids). Keys are ``PARAM + suffix``. Collective; the walk order is (layer, local index,
    tensor), identical on every rank whatever the string order of the expert ids."""
    ep = groups.ep
    if ep.size == 1:
        return tensors
    num_local = len(next(moe_layers(model)).local_expert_ids)
    out: dict[str, torch.Tensor] = {}
    walk: list[tuple[str, int, str]] = []
    for key, t in tensors.items():
        parts = _split_key(key, suffixes)
        if parts is None:
            out[key] = t
        else:
            prefix, expert, rest = parts
            walk.append((prefix, expert - ep.rank * num_local, rest))
    for prefix, j, rest in sorted(walk):
        t = tensors[f"{prefix}{ep.rank * num_local + j}{rest}"].contiguous()
        gathered = [torch.empty_like(t) for _ in range(ep.size)]
        dist.all_gather(gathered, t, group=ep.group)
        for r, part in enumerate(gathered):
            out[f"{prefix}{r * num_local + j}{rest}"] = part
    return out

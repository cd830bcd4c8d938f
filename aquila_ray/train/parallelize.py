"""The trainer's distributed MoE code, in one room: expert-parallel process groups, the rank's share of
the experts (sharded from a seeded build, sliced from a full state dict, or upcycled online), DeepSpeed
registration and optimizer groups, gradient reduction for plain torch loops, and gathering expert tensors
for the model export. ``aquila_ray/moe`` keeps the single-device layer (its dispatcher's all-to-all is the
layer's forward under expert parallelism); ``train/engine.py`` calls this module in its fixed order.

Layout (DeepSpeed's legacy "E + D" order, Megatron's too): with world size W and expert-parallel size P,
- expert-parallel (EP) groups are consecutive ranks ``[g*P, (g+1)*P)``: together they hold one copy of
  every expert (rank r holds experts ``[(r % P) * E/P, (r % P + 1) * E/P)``) and exchange tokens by
  all-to-all;
- expert-data-parallel (EDP) groups are the ranks with equal ``r % P`` (``r, r+P, r+2P, ...``): they hold
  the same experts, so expert gradients are reduced over them; everything else (attention, norms,
  embeddings, routers) is reduced over all W ranks.
Gradient semantics: after ``allreduce_gradients`` every gradient is that of the mean of the W ranks'
losses (expert gradients: summed over the EDP group and divided by W, because the all-to-all backward
already summed the other EP ranks' tokens into them). DeepSpeed's engine uses the same division
(``_reduce_expert_gradients`` divides by the data-parallel world size).

Trainer recipe, on every rank after ``torch.distributed`` (or ``deepspeed.init_distributed``) is up::

    groups = create_expert_parallel_groups(ep_size)          # collective: every rank creates every group
    # either build the rank's share directly ...
    with use_expert_parallel(groups.ep):
        model = Aquila3(cfg)                                  # then load_local_state(model, full_sd)
    # ... or shard a full model, or upcycle online:
    shard_experts(model, groups.ep)
    model = build_upcycled_model(dense_dir, cfg, groups.ep, UpcycleOptions(seed=seed))
    # plain torch loop: loss.backward(); allreduce_gradients(model, groups); opt.step()
    # DeepSpeed (ZeRO 0/1/2; native MoE does not support ZeRO-3):
    mark_expert_params(model, groups.group_name)             # allreduce=False + group_name on expert params
    param_groups = split_moe_param_groups([{"params": list(model.parameters()), "name": "all"}])
    register_with_deepspeed(model, groups)                  # DeepSpeed then reduces experts over EDP
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups, config=...)
    # a full state dict (every expert): sd = gather_expert_state_dict(model, groups)  (collective; small
    # models only: the trainer's checkpoints are sharded, aquila_ray.train.checkpointing)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aquila_ray.config.model import ModelConfig
from aquila_ray.config.train import TrainConfig
from aquila_ray.errors import ConfigError
from aquila_ray.model import Aquila3, MoELayer, build_model
from aquila_ray.moe.dispatcher import ExpertParallel
from aquila_ray.upcycle.online import build_upcycled_model
from aquila_ray.upcycle.upcycle import UpcycleOptions

_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts\.)(\d+)(\..+)\Z")


def expert_parallel_layout(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(EP groups, EDP groups) as rank lists: EP groups consecutive, EDP groups strided by ep_size."""
    if ep_size < 1 or world_size % ep_size:
        raise ConfigError(f"expert-parallel size {ep_size} must be >= 1 and divide the world size {world_size}")
    ep_groups = [list(range(g * ep_size, (g + 1) * ep_size)) for g in range(world_size // ep_size)]
    edp_groups = [list(range(i, world_size, ep_size)) for i in range(ep_size)]
    return ep_groups, edp_groups


@dataclass
class ExpertParallelGroups:
    """This rank's expert-parallel placement and the process groups it belongs to."""

    ep: ExpertParallel
    """Placement inside the EP group (``ep.group`` is the EP process group); give it to the model."""
    expert_dp_group: Any
    """Process group of the ranks holding the same experts (reduce expert gradients here)."""
    world_size: int
    ep_ranks: list[int] = field(default_factory=list)
    expert_dp_ranks: list[int] = field(default_factory=list)

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for these groups (``param.group_name`` of expert parameters)."""
        return f"ep_size_{self.ep.size}"


def create_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Create every EP and EDP group (collective: every rank must call it, in the same order)."""
    if not dist.is_initialized():
        if ep_size == 1:
            return ExpertParallelGroups(ExpertParallel(), None, 1, [0], [0])
        raise ConfigError(f"expert-parallel size {ep_size} needs torch.distributed to be initialized first")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_groups, edp_groups = expert_parallel_layout(world, ep_size)
    mine_ep = mine_edp = None
    mine_ep_ranks: list[int] = []
    mine_edp_ranks: list[int] = []
    for ranks in ep_groups:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine_ep, mine_ep_ranks = g, ranks
    for ranks in edp_groups:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine_edp, mine_edp_ranks = g, ranks
    ep = ExpertParallel(size=ep_size, rank=rank % ep_size, group=mine_ep)
    return ExpertParallelGroups(ep, mine_edp, world, mine_ep_ranks, mine_edp_ranks)


def moe_layers(model: nn.Module) -> Iterator[MoELayer]:
    for m in model.modules():
        if isinstance(m, MoELayer):
            yield m


def balance_experts(model: nn.Module, load_LE: torch.Tensor) -> None:
    """After an optimizer step: move every MoE layer's balancing bias (``MoEConfig.bias_update_rate > 0``)
    from the step's load, layer l's row of ``load_LE`` (assignments per expert summed over all ranks and
    micro-batches, so every rank applies the same update). No-op without the balancer."""
    for layer, load_E in zip(moe_layers(model), load_LE, strict=True):
        if layer.router.expert_bias is not None:
            layer.router.update_bias(load_E)


def shard_experts(model: nn.Module, ep: ExpertParallel) -> nn.Module:
    """Keep only ``ep``'s experts in every MoE layer of a model built with all of them (in place)."""
    for layer in moe_layers(model):
        layer.set_expert_parallel(ep)
    return model


def is_expert_param_name(name: str) -> bool:
    return _EXPERT_KEY.match(name) is not None


def expert_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert weight the model holds (routers are not expert parameters)."""
    for name, p in model.named_parameters():
        if is_expert_param_name(name):
            yield name, p


def mark_expert_params(model: nn.Module, group_name: str) -> int:
    """Tag expert parameters the way DeepSpeed recognizes them (``allreduce=False``, ``group_name``)."""
    n = 0
    for _, p in expert_params(model):
        p.allreduce = False  # type: ignore[attr-defined]
        p.group_name = group_name  # type: ignore[attr-defined]
        n += 1
    return n


def split_moe_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer groups with marked expert parameters split out (``moe: True``, ``name: ep_size_P``), via
    ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``. Groups need a ``name``."""
    # deferred: DeepSpeed (~1 s, and it picks an accelerator) only when its optimizer groups are asked for
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = [dict(g, name=g.get("name", f"group_{i}")) for i, g in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(groups)  # type: ignore[no-any-return]


def allreduce_gradients(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Make every gradient that of the mean loss over all ranks: non-expert gradients averaged over the
    world, expert gradients summed over the expert-data-parallel group and divided by the world size."""
    if groups.world_size == 1:
        return
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        expert = is_expert_param_name(name)
        dist.all_reduce(p.grad, group=groups.expert_dp_group if expert else None)
        p.grad.div_(groups.world_size)


def local_expert_state(model: nn.Module, full_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a full (every expert) state dict that this rank's model holds."""
    mine = set(model.state_dict())
    missing = sorted(mine - set(full_state))
    if missing:
        raise ConfigError(f"the state dict lacks {len(missing)} tensor(s) this rank needs, e.g. {missing[:3]}")
    return {k: v for k, v in full_state.items() if k in mine}


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


def gather_expert_state_dict(model: nn.Module, groups: ExpertParallelGroups) -> dict[str, torch.Tensor]:
    """The full state dict (every expert) on every rank of the EP group. Collective; it holds the whole
    model, so it is for small models and tests (the trainer streams ``gather_expert_tensor`` instead)."""
    num_experts = next((layer.num_experts for layer in moe_layers(model)), 0)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        out.update(gather_expert_tensor(key, t.detach(), groups, num_experts))
    return out


def register_with_deepspeed(model: nn.Module, groups: ExpertParallelGroups) -> nn.Module:
    """Let ``deepspeed.initialize`` treat the model's MoE layers as MoE: our EP/EDP process groups go into
    DeepSpeed's group registry under ``groups.group_name``, and a parameterless marker module that is a
    ``deepspeed.moe.layer.MoE`` is attached (DeepSpeed switches on its MoE gradient path by
    ``isinstance(module, MoE)``; its own TopKGate has no z-loss and Gumbel-samples the 2nd expert, so the
    routing stays ours). Call after ``mark_expert_params``. The marker adds no state-dict entries."""
    # deferred: DeepSpeed (~1 s) only when registering with it; plain-torch MoE loops and tests run without it
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups as ds_groups

    name = groups.group_name
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep.group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.expert_dp_group
    if hasattr(ds_groups, "_EXPERT_PARALLEL_GROUP_RANKS"):
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = groups.ep_ranks
    if hasattr(ds_groups, "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = groups.expert_dp_ranks
    layers = list(moe_layers(model))
    if not layers:
        raise ConfigError("register_with_deepspeed: the model has no MoE layers")

    marker = MoE.__new__(MoE)
    nn.Module.__init__(marker)
    marker.num_experts = layers[0].num_experts
    marker.ep_size = groups.ep.size
    marker.expert_group_name = name
    marker.num_local_experts = len(layers[0].local_expert_ids)
    marker.forward = _marker_forward  # type: ignore[method-assign]
    marker.set_deepspeed_parallelism = _groups_already_registered  # type: ignore[method-assign]
    model.add_module("deepspeed_moe_marker", marker)
    return model


def _groups_already_registered(*args: Any, **kwargs: Any) -> None:
    """DeepSpeed would create its own groups here; ours are registered under the same name already."""


def _marker_forward(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("the DeepSpeed MoE marker is not a layer; it only flags the model as MoE")


def build_moe_model(cfg: TrainConfig, model_cfg: ModelConfig, groups: ExpertParallelGroups) -> Aquila3:
    """This rank's MoE model on a fresh start: init=upcycle builds the local experts online from the dense
    checkpoint; otherwise a seeded full model is built and sharded, so every expert-parallel size starts
    from the same weights. (init=checkpoint and resumes read only the rank's tensors: ``engine``.)"""
    if cfg.init == "upcycle":
        return build_upcycled_model(cfg.init_from, model_cfg, groups.ep,  # type: ignore[arg-type]
                                    UpcycleOptions(seed=cfg.seed)).float()
    model = build_model(model_cfg, seed=cfg.seed)
    shard_experts(model, groups.ep)
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


__all__ = [
    "ExpertParallelGroups",
    "balance_experts",
    "allreduce_gradients",
    "build_moe_model",
    "create_expert_parallel_groups",
    "expert_parallel_layout",
    "expert_params",
    "gather_expert_state_dict",
    "gather_expert_tensor",
    "is_expert_param_name",
    "local_expert_state",
    "mark_expert_params",
    "moe_layers",
    "moe_param_groups",
    "register_with_deepspeed",
    "shard_experts",
    "split_moe_param_groups",
]

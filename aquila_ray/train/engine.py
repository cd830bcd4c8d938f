"""Parallelism applied in one fixed order (torchtitan's ``parallelize_llama``): process groups, model
build (dense, MoE, or online upcycling), parameter groups, DeepSpeed engine; plus the optimizer state in
a layout-independent form.

The order on every worker: (1) expert-parallel groups (MoE only; every rank creates every group, in the
same order, as torch.distributed requires), (2) the single-device model with its weights (seeded init,
an init checkpoint, online upcycling, or the resumed checkpoint), (3) AdamW parameter groups (no weight
decay on norms and biases; MoE expert parameters in their own groups), (4) ``deepspeed.initialize`` with
ZeRO-1 (or 2) and gradient accumulation derived from the worker count.

Training state is checkpointed per rank (``owned_state``: the rank's ZeRO slice of every fp32 master weight
and Adam moment, as views into DeepSpeed's buffers; ``aquila_ray.train.checkpointing`` writes and reshards
them with torch.distributed.checkpoint); the model export streams one whole tensor at a time
(``iter_model_tensors``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aquila_ray.checkpoint import CheckpointReader
from aquila_ray.config.model import ModelConfig
from aquila_ray.config.train import TrainConfig
from aquila_ray.errors import CheckpointError
from aquila_ray.model import Aquila3, build_model
from aquila_ray.train.checkpointing import ADAM_KEYS, WEIGHT, Fragment, state_key
from aquila_ray.train.parallelize import (
    build_moe_model,
    create_expert_parallel_groups,
    gather_expert_tensor,
    is_expert_param_name,
    moe_param_groups,
    shard_experts,
)


@dataclass
class ParallelDims:
    """How the workers are arranged: data parallel over all ranks, experts sharded over ``ep`` ranks."""

    world_size: int
    rank: int
    ep: int = 1


def create_parallel_groups(dims: ParallelDims, model_cfg: ModelConfig) -> Any:
    """Step 1: the expert-parallel groups (``aquila_ray.train.parallelize.ExpertParallelGroups``) for MoE models;
    None for dense ones. Collective: every rank creates every group in the same order."""
    if model_cfg.moe is None:
        return None

    return create_expert_parallel_groups(dims.ep)


def build_worker_model(cfg: TrainConfig, model_cfg: ModelConfig, ep_groups: Any, device: torch.device,
                       resuming: bool = False) -> Aquila3:
    """Step 2: this rank's model with its starting weights and ``cfg.activation_checkpointing``.
    ``resuming``: built on the meta device and only allocated (no init, no checkpoint read; the sharded
    checkpoint fills it after the engine is built); otherwise ``cfg.init`` decides (seeded init, an init
    checkpoint, online upcycling)."""
    model = _initial_model(cfg, model_cfg, ep_groups, device, resuming)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


def _initial_model(cfg: TrainConfig, model_cfg: ModelConfig, ep_groups: Any, device: torch.device,
                   resuming: bool) -> Aquila3:
    if resuming or cfg.init == "checkpoint":
        model = _allocated_model(model_cfg, ep_groups, device)
        if not resuming:
            _read_own_tensors(model, cfg.init_from)  # type: ignore[arg-type]
        return model
    if model_cfg.moe is not None:
        return build_moe_model(cfg, model_cfg, ep_groups).to(device)
    return build_model(model_cfg, seed=cfg.seed).to(device)


def _allocated_model(model_cfg: ModelConfig, ep_groups: Any, device: torch.device) -> Aquila3:
    """This rank's model built on the meta device (only its experts), then allocated uninitialized."""
    with torch.device("meta"):
        model = Aquila3(model_cfg)
    if ep_groups is not None:
        shard_experts(model, ep_groups.ep)
    model = model.to_empty(device=device)
    model.tie_weights()
    return model


@torch.no_grad()
def _read_own_tensors(model: Aquila3, directory: str) -> None:
    """Fill ``model`` from a model checkpoint, one tensor at a time, reading only the tensors this rank
    holds (its experts, under their global ids). The driver verified the shard digests
    (``trainer.validate``), so the workers do not hash them again."""
    reader = CheckpointReader(directory, verify=False)
    tied = model.config.tie_embeddings
    wanted = {k: t for k, t in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    missing = [k for k in wanted if k not in reader]
    if missing:
        raise CheckpointError(f"{directory} lacks {len(missing)} tensor(s) this rank needs, e.g. {missing[:3]}")
    for name, t in wanted.items():
        t.copy_(reader.get(name))


def param_groups(model: nn.Module, weight_decay: float, ep_groups: Any = None) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices and embeddings, none on norms and biases; router and expert weights
    in groups of their own when ``MoEConfig.router_lr_mult`` / ``expert_lr_mult`` differ from 1 (the group's
    ``lr_mult``, applied by ``set_lr``); MoE expert parameters in separate groups under expert parallelism
    (DeepSpeed reduces them over the expert-data-parallel group)."""
    moe = getattr(model.config, "moe", None)
    mults = {"router": moe.router_lr_mult, "experts": moe.expert_lr_mult} if moe is not None else {}
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not name.endswith("norm.weight")
        part = ("router" if ".mlp.router." in name else "experts" if is_expert_param_name(name) else "")
        mult = mults.get(part, 1.0)
        key = ("decay" if decay else "no_decay") + (f".{part}" if mult != 1.0 else "")
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0, "name": key,
                                        **({"lr_mult": mult} if mult != 1.0 else {})})
        group["params"].append(p)
    out = list(groups.values())
    if ep_groups is not None:
        out = moe_param_groups(model, out, ep_groups)
    return out


def effective_zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """ZeRO partitions over data-parallel ranks; with one CPU worker there is nothing to partition and stage
    1/2 would only add flat-buffer copies each step, so it runs stage 0 (same result). On GPU the configured
    stage always runs: DeepSpeed accumulates bf16 gradients in fp32 only inside its ZeRO optimizers."""
    return cfg.scaling.zero_stage if world_size > 1 or cfg.scaling.use_gpu else 0


def deepspeed_config(cfg: TrainConfig, micro_batch: int, grad_accum: int, world_size: int) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": effective_zero_stage(cfg, world_size)},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.scaling.use_gpu},
        # bf16 gradients are summed over micro-steps in fp32 buffers (BF16_Optimizer / ZeRO's separate
        # accumulation), never in bf16
        **({"data_types": {"grad_accum_dtype": "fp32"}} if cfg.scaling.use_gpu else {}),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # always explicit: DeepSpeed's default is 1.0, so leaving it out would clip when grad_clip=0 says "off"
        "gradient_clipping": cfg.optimizer.grad_clip,
    }
    return conf


def build_engine(model: nn.Module, cfg: TrainConfig, micro_batch: int, grad_accum: int,
                 world_size: int, ep_groups: Any = None) -> Any:
    """Steps 3 and 4: parameter groups and the DeepSpeed engine, with torch's AdamW (no fused_adam build)."""
    import deepspeed  # deferred: DeepSpeed (~1 s, picks an accelerator) only when an engine is built

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, ep_groups), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, micro_batch, grad_accum, world_size))
    return engine


def set_lr(engine: Any, lr: float) -> None:
    """The schedule's lr on every optimizer group, times the group's ``lr_mult`` (router, experts)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


# ---- the rank's own training state (sharded checkpoints) ---------------------------------------------------

def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's wrapper (ZeRO-1/2 and bf16 wrappers hold it as ``.optimizer``)."""
    opt = engine.optimizer
    return opt.optimizer if isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer) else opt


def _zero_fragment(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> tuple[torch.Tensor, int, int, int] | None:
    """(flat fp32 partition, start in it, start in the parameter, numel) of this rank's slice of ``p``.

    DeepSpeed's ZeRO-1/2 and bf16 optimizers give each low-precision parameter an ``_hp_mapping`` into the
    flat fp32 partition that torch's optimizer steps (one per parameter group); None when this rank's
    partition holds none of ``p``."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    flat = opt.param_groups[mapping.param_group_index]["params"][0]
    return flat, mapping.hp_fragment_address.start, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel


def _is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "_hp_mapping") for p in model.parameters())


def _adam_state(opt: torch.optim.Optimizer, key: torch.Tensor) -> dict[str, torch.Tensor]:
    """The AdamW state of ``key`` (a parameter or a flat partition), created as torch would at its first
    step when the optimizer has not stepped yet (a resume loads into it)."""
    st = opt.state[key]
    if not st:
        st.update({"step": torch.tensor(0.0), **{k: torch.zeros_like(key, dtype=torch.float32) for k in ADAM_KEYS}})
    return st


def owned_state(engine: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's slices of every parameter's fp32 master weight and Adam moments, keyed by
    ``state_key(kind, name)``: with ZeRO, the rank's partition; without (one worker), the whole tensors;
    expert parameters under their global expert ids. Values are checkpoint ``Fragment`` views into the
    optimizer's buffers, so ``save_sharded_state`` writes them without a copy and ``load_sharded_state``
    fills them in place. Nothing here is gathered from other ranks."""
    opt = _torch_optimizer(engine)
    out: dict[str, torch.Tensor] = {}
    partitioned = _is_partitioned(model)
    for name, p in model.named_parameters():
        if partitioned:
            frag = _zero_fragment(opt, p)
            if frag is None or frag[3] == 0:
                continue
            flat, hp_start, lp_start, n = frag
            st = _adam_state(opt, flat)
            sources = {WEIGHT: flat.data, **{k: st[k] for k in ADAM_KEYS}}
            for kind, src in sources.items():
                out[state_key(kind, name)] = Fragment(src[hp_start:hp_start + n], lp_start, p.numel())
        else:  # ZeRO-0 fp32 (one worker): torch's own per-parameter state
            st = _adam_state(opt, p)
            sources = {WEIGHT: p.data, **{k: st[k] for k in ADAM_KEYS}}
            for kind, src in sources.items():
                out[state_key(kind, name)] = Fragment(src.view(-1), 0, p.numel())
    return out


def optimizer_step(engine: Any) -> int:
    """How many steps the optimizer has taken (Adam's bias correction uses it)."""
    steps = [int(st["step"]) for st in _torch_optimizer(engine).state.values() if "step" in st]
    return max(steps, default=0)


def finish_load(engine: Any, model: nn.Module, step: int) -> None:
    """After ``load_sharded_state`` filled ``owned_state``: set the optimizer step and, with ZeRO, copy the
    loaded fp32 master partitions into the module's weights (DeepSpeed's ``update_lp_params``: each rank
    casts its partition, then an all-gather over the data-parallel group). Collective with ZeRO."""
    opt = _torch_optimizer(engine)
    for st in opt.state.values():
        st["step"] = torch.tensor(float(step))
    if _is_partitioned(model):
        engine.optimizer.update_lp_params()
        if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
            engine.optimizer._hp_optimizer_states_linked = False  # relink fragments to the new state tensors


def _full_master(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 master weight of ``p`` from every rank's slice (on p's device). Collective over p's
    data-parallel group."""
    full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    frag = _zero_fragment(opt, p)
    if frag is not None:
        flat, hp_start, lp_start, n = frag
        full[lp_start:lp_start + n] = flat.data[hp_start:hp_start + n]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(full, group=getattr(p, "_dp_group", None))
    return full.reshape(p.shape)


def iter_model_tensors(engine: Any, model: Aquila3, ep_groups: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the model checkpoint as a whole fp32 CPU tensor, one at a time, in a fixed order
    (experts under their global ids): what rank 0 streams into the model export. Low-precision modules
    (bf16) contribute their fp32 masters. Collective: every rank iterates to the end; memory is one tensor
    (times the expert-parallel size for an expert tensor)."""
    opt = _torch_optimizer(engine)
    masters = _is_partitioned(model) and any(p.dtype != torch.float32 for p in model.parameters())
    params = dict(model.named_parameters())
    for name, t in model.state_dict(keep_vars=True).items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue  # stored once, as embed.weight
        p = params.get(name)
        full = _full_master(opt, p) if masters and p is not None else t.detach()
        parts: Iterator[tuple[str, torch.Tensor]] = iter([(name, full)])
        if ep_groups is not None:  # gathered on the device, then moved to the CPU one tensor at a time

            parts = gather_expert_tensor(name, full, ep_groups, model.config.moe.num_experts)  # type: ignore[union-attr]
        for key, part in parts:
            yield key, part.to("cpu", torch.float32 if part.is_floating_point() else part.dtype)

"""Parallelism applied in one fixed order (torchtitan's ``parallelize_llama``): process groups, model
build (dense, MoE, or online upcycling), parameter groups, DeepSpeed engine; plus the optimizer state in
a layout-independent form.

The order on every worker: (1) expert-parallel groups (MoE only; every rank creates every group, in the
same order, as torch.distributed requires), (2) the single-device model with its weights (seeded init,
an init checkpoint, online upcycling, or the resumed checkpoint), (3) AdamW parameter groups (no weight
decay on norms and biases; MoE expert parameters in their own groups), (4) ``deepspeed.initialize`` with
ZeRO-1 (or 2) and gradient accumulation derived from the worker count.

Optimizer state is saved per parameter name (full fp32 ``exp_avg`` / ``exp_avg_sq`` tensors, assembled
from the ZeRO partitions) so that a checkpoint written at W workers loads at any other W; DeepSpeed's own
ZeRO checkpoints only load at the world size that wrote them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aquila_ray.config.model import ModelConfig
from aquila_ray.config.train import TrainConfig
from aquila_ray.model import Aquila3, build_model

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class ParallelDims:
    """How the workers are arranged: data parallel over all ranks, experts sharded over ``ep`` ranks."""

    world_size: int
    rank: int
    ep: int = 1


def create_parallel_groups(dims: ParallelDims, model_cfg: ModelConfig) -> Any:
    """Step 1: the expert-parallel groups (``aquila_ray.moe.parallel.ExpertParallelGroups``) for MoE models;
    None for dense ones. Collective: every rank creates every group in the same order."""
    if model_cfg.moe is None:
        return None
    from aquila_ray.train.moe_support import create_groups

    return create_groups(dims.ep)


def build_worker_model(cfg: TrainConfig, model_cfg: ModelConfig, ep_groups: Any,
                       state_dict: dict[str, torch.Tensor] | None, device: torch.device) -> Aquila3:
    """Step 2: the model with its starting weights. ``state_dict`` (full, layout-independent: the resumed
    checkpoint) wins; otherwise ``cfg.init`` decides (scratch, an init checkpoint, online upcycling)."""
    if state_dict is None and cfg.init == "checkpoint":
        from aquila_ray.checkpoint import load_state_dict

        state_dict, _ = load_state_dict(cfg.init_from)  # type: ignore[arg-type]
    if model_cfg.moe is not None:
        from aquila_ray.train.moe_support import build_moe_model

        return build_moe_model(cfg, model_cfg, ep_groups, state_dict).to(device)
    model = build_model(model_cfg, seed=cfg.seed if state_dict is None else None)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not (model_cfg.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"state dict does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    return model.to(device)


def full_model_state_dict(model: nn.Module, ep_groups: Any) -> dict[str, torch.Tensor]:
    """Every weight, unsharded, keyed by parameter name (experts gathered over the EP group). Collective."""
    sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    if ep_groups is not None:
        from aquila_ray.train.moe_support import gather_experts

        sd = gather_experts(model, sd, ep_groups)
    return sd


def param_groups(model: nn.Module, weight_decay: float, ep_groups: Any = None) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices and embeddings, none on norms and biases; MoE expert parameters in
    separate groups (DeepSpeed reduces them over the expert-data-parallel group)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith("norm.weight") else no_decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if ep_groups is not None:
        from aquila_ray.train.moe_support import moe_param_groups

        groups = moe_param_groups(model, groups, ep_groups)
    return groups


def effective_zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """ZeRO partitions over data-parallel ranks; with one worker there is nothing to partition and stage 1/2
    would only add flat-buffer copies each step, so a single worker runs stage 0 (same result)."""
    return cfg.scaling.zero_stage if world_size > 1 else 0


def deepspeed_config(cfg: TrainConfig, micro_batch: int, grad_accum: int, world_size: int) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": effective_zero_stage(cfg, world_size)},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.scaling.use_gpu},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # always explicit: DeepSpeed's default is 1.0, so leaving it out would clip when grad_clip=0 says "off"
        "gradient_clipping": cfg.optimizer.grad_clip,
    }
    return conf


def build_engine(model: nn.Module, cfg: TrainConfig, micro_batch: int, grad_accum: int,
                 world_size: int, ep_groups: Any = None) -> Any:
    """Steps 3 and 4: parameter groups and the DeepSpeed engine, with torch's AdamW (no fused_adam build)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay, ep_groups), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, micro_batch, grad_accum, world_size))
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


# ---- layout-independent optimizer state -----------------------------------------------------------------

def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's wrapper (ZeRO-1/2 and bf16 wrappers hold it as ``.optimizer``)."""
    opt = engine.optimizer
    return opt.optimizer if isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer) else opt


def _zero_fragment(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> tuple[torch.Tensor, int, int, int] | None:
    """(flat fp32 partition, start in it, start in the parameter, numel) of this rank's slice of ``p``.

    DeepSpeed's ZeRO-1/2 and bf16 optimizers give each low-precision parameter an ``_hp_mapping`` into the
    flat fp32 partition that torch's optimizer steps (one per parameter group)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    flat = opt.param_groups[mapping.param_group_index]["params"][0]
    return flat, mapping.hp_fragment_address.start, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel


def _is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "_hp_mapping") for p in model.parameters())


def _gather_hp(engine: Any, model: nn.Module, dims: ParallelDims, key: str | None) -> dict[str, torch.Tensor]:
    """Full fp32 tensors per parameter name from the partitioned flat fp32 buffers: Adam moment ``key``, or
    the fp32 master weights when ``key`` is None. Collective over each parameter's data-parallel group."""
    opt = _torch_optimizer(engine)
    out = {}
    for name, p in model.named_parameters():
        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        frag = _zero_fragment(opt, p)
        if frag is not None:
            flat, hp_start, lp_start, n = frag
            src = flat if key is None else opt.state.get(flat, {}).get(key)
            if src is not None:
                full[lp_start:lp_start + n] = src[hp_start:hp_start + n]
        if dims.world_size > 1:
            dist.all_reduce(full, group=getattr(p, "_dp_group", None))
        out[name] = full.reshape(p.shape).cpu()
    return out


def gather_master_weights(engine: Any, model: nn.Module, dims: ParallelDims, ep_groups: Any = None
                          ) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights per name when the module itself is low precision (bf16 on GPU), else None
    (fp32 modules hold the master weights). Collective."""
    if all(p.dtype == torch.float32 for p in model.parameters()) or not _is_partitioned(model):
        return None
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}  # buffers, tied names
    sd.update(_gather_hp(engine, model, dims, None))
    if ep_groups is not None:
        from aquila_ray.train.moe_support import gather_experts

        sd = gather_experts(model, sd, ep_groups)
    return sd


def load_master_weights(engine: Any, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put full fp32 master weights into the partitioned fp32 buffers (low-precision modules only: their
    fp32 copy was built from the bf16 parameters and would lose the checkpoint's low bits)."""
    if all(p.dtype == torch.float32 for p in model.parameters()) or not _is_partitioned(model):
        return
    opt = _torch_optimizer(engine)
    for name, p in model.named_parameters():
        frag = _zero_fragment(opt, p)
        if frag is not None:
            flat, hp_start, lp_start, n = frag
            flat.data[hp_start:hp_start + n].copy_(state[name].reshape(-1)[lp_start:lp_start + n])


def gather_optimizer_state(engine: Any, model: nn.Module, dims: ParallelDims,
                           ep_groups: Any = None) -> tuple[dict[str, torch.Tensor], int]:
    """Full fp32 Adam moments per parameter name (``NAME.exp_avg``, ``NAME.exp_avg_sq``) and the optimizer
    step. Collective: every rank calls it; the assembled tensors are valid on every rank."""
    opt = _torch_optimizer(engine)
    out: dict[str, torch.Tensor] = {}
    steps = [int(st["step"]) for st in opt.state.values() if "step" in st]
    step = max(steps, default=0)
    if _is_partitioned(model):
        for key in ADAM_KEYS:
            out.update({f"{name}.{key}": t for name, t in _gather_hp(engine, model, dims, key).items()})
    else:  # ZeRO-0 fp32: torch's own per-parameter state, replicated on every rank
        for name, p in model.named_parameters():
            st = opt.state.get(p, {})
            for key in ADAM_KEYS:
                out[f"{name}.{key}"] = (st[key].float().cpu().clone() if key in st
                                        else torch.zeros(p.shape, dtype=torch.float32))
    if dims.world_size > 1:
        t = torch.tensor([step], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        step = int(t.item())
    if ep_groups is not None:
        from aquila_ray.train.moe_support import gather_experts

        out = gather_experts(model, out, ep_groups, suffixes=tuple(f".{k}" for k in ADAM_KEYS))
    return out, step


def load_optimizer_state(engine: Any, model: nn.Module, state: dict[str, torch.Tensor], step: int,
                         dims: ParallelDims) -> None:
    """Put full per-name Adam moments into the (possibly ZeRO-partitioned) optimizer, at optimizer step
    ``step``. Works whatever the world size (and expert-parallel layout) that saved them: only the names
    this rank's model holds are read."""
    opt = _torch_optimizer(engine)
    missing = [f"{n}.{k}" for n, _ in model.named_parameters() for k in ADAM_KEYS if f"{n}.{k}" not in state]
    if missing:
        raise RuntimeError(f"optimizer state lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    step_t = torch.tensor(float(step), dtype=torch.float32)
    if _is_partitioned(model):
        for group in opt.param_groups:
            for flat in group["params"]:
                opt.state[flat] = {"step": step_t.clone(), **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
        for name, p in model.named_parameters():
            frag = _zero_fragment(opt, p)
            if frag is None:
                continue
            flat, hp_start, lp_start, n = frag
            for key in ADAM_KEYS:
                src = state[f"{name}.{key}"].reshape(-1)[lp_start:lp_start + n]
                opt.state[flat][key][hp_start:hp_start + n].copy_(src)
        if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
            engine.optimizer._hp_optimizer_states_linked = False  # relink fragments to the new state tensors
    else:
        for name, p in model.named_parameters():
            opt.state[p] = {"step": step_t.clone(),
                            **{k: state[f"{name}.{k}"].to(p.device, torch.float32).reshape(p.shape).clone()
                               for k in ADAM_KEYS}}

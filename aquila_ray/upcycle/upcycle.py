"""Sparse upcycling: a dense Aquila3 -> an MoE Aquila3 whose every MLP becomes E experts.

Plain upcycling (Komatsuzaki et al., arXiv 2212.05055; AquilaMoE, arXiv 2408.06567): every expert is an
exact copy of the dense MLP; the router is new, N(0, router_init_std). With top-k renormalized weights
(``topk_then_softmax``, or ``softmax_then_topk`` with ``renormalize``) and no dropped tokens the MoE
layer computes ``sum_k w_k * MLP(x) = MLP(x)``: the upcycled model has the dense model's logits.

Granular upcycling (NVIDIA, arXiv 2410.07524, "virtual group" init; the layout Megatron-LM's
upcycling_utils uses): with granularity G each expert is a 1/G slice of the dense MLP along its
intermediate dimension; expert ``e`` holds slice ``e % G`` and belongs to virtual group ``e // G``; the
E/G virtual groups each hold one copy of every slice, and all G experts of a virtual group share one
router row. Equal rows give bit-equal logits, so top-k with k a multiple of G picks whole virtual groups:
every slice is selected k/G times with the same total weight. With renormalized routing that weight is
1/G per slice, and **weight scaling** by G makes the layer exactly the dense MLP again. Without
renormalization (``softmax_then_topk``, renormalize=False) the selected probability mass is random; the
paper scales by ``E*G/k`` (its value at uniform routing), which preserves the function only in
expectation. We apply the whole factor to ``down_proj`` (linear, hence exact); Megatron spreads its cube
root over fc1 and fc2, which is not exact for SwiGLU because silu is not homogeneous.

Everything here is a pure function of tensors (STYLE.md rule 4). ``upcycle_tensors`` is the one
transform; ``upcycle_state_dict`` (offline, all experts) and ``aquila_ray.upcycle.online`` (one
expert-parallel rank's experts, tensors read one at a time from the dense checkpoint) both call it, so the
two give identical weights.

Shape legend: D hidden, F dense intermediate, F_e = F / G expert intermediate, E experts, G granularity.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from aquila_ray.config import ModelConfig, MoEConfig, to_dict
from aquila_ray.errors import ConfigError

_MLP_KEY = re.compile(r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight\Z")
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class UpcycleOptions:
    """How the dense weights become experts."""

    seed: int = 0
    """Seeds the router init; layer i uses ``seed * 1_000_003 + i`` (identical offline and online)."""
    weight_scaling: bool = True
    """2410.07524's expert weight scaling (G for renormalized routing, E*G/k otherwise); with G == 1 and
    renormalized routing the factor is 1 either way."""
    experts: tuple[int, ...] | None = None
    """Materialize only these global expert ids (an expert-parallel rank's share); None: all."""


DEFAULT_OPTIONS = UpcycleOptions()


def moe_config(src: ModelConfig, num_experts: int = 8, top_k: int = 2, granularity: int = 1,
               **moe_fields: object) -> ModelConfig:
    """The upcycled model's config: ``src`` with ``moe`` set; experts are F/G wide."""
    if src.moe is not None:
        raise ConfigError("the source model is already a Mixture of Experts (ModelConfig.moe is set); "
                          "upcycling needs a dense checkpoint")
    if src.intermediate_size % granularity:
        raise ConfigError(f"granularity={granularity} does not divide the dense intermediate_size="
                          f"{src.intermediate_size}; choose a granularity that divides it")
    expert = src.intermediate_size // granularity
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, granularity=granularity,
                    expert_intermediate_size=None if granularity == 1 else expert, **moe_fields)  # type: ignore[arg-type]
    return dataclasses.replace(src, moe=moe, extra=dict(src.extra))


def upcycled_config(src: ModelConfig, moe: MoEConfig) -> ModelConfig:
    """``moe_config`` from a whole MoEConfig (a preset, a recipe's ``scale_out.moe``); the expert width is
    ``src``'s F / granularity, whatever ``moe.expert_intermediate_size`` says."""
    fields = {k: v for k, v in to_dict(moe).items()
              if k not in ("num_experts", "top_k", "granularity", "expert_intermediate_size")}
    return moe_config(src, moe.num_experts, moe.top_k, moe.granularity, **fields)


def renormalized(moe: MoEConfig) -> bool:
    """Do the k combine weights of a token sum to 1?"""
    return moe.router_order == "topk_then_softmax" or moe.renormalize


def weight_scale(dst: ModelConfig, options: UpcycleOptions = DEFAULT_OPTIONS) -> float:
    """Factor on each expert's down_proj (2410.07524): G for renormalized routing, else E*G/k."""
    moe = _moe(dst)
    if not options.weight_scaling:
        return 1.0
    if renormalized(moe):
        return float(moe.granularity)
    return moe.num_experts * moe.granularity / moe.top_k


def exactly_preserving(dst: ModelConfig, options: UpcycleOptions = DEFAULT_OPTIONS) -> bool:
    """Will the fresh MoE compute the dense function (up to float rounding)?"""
    moe = _moe(dst)
    scale_ok = moe.granularity == 1 or options.weight_scaling
    return renormalized(moe) and moe.capacity_factor is None and scale_ok and moe.drop_upcycling_ratio == 0


def check_compatible(src: ModelConfig, dst: ModelConfig) -> None:
    """dst must be src with ``moe`` set and experts that are 1/G slices of the dense MLP."""
    if src.moe is not None:
        raise ConfigError("the source model is already a Mixture of Experts (ModelConfig.moe is set); "
                          "upcycling needs a dense checkpoint")
    moe = _moe(dst)
    a, b = to_dict(src), to_dict(dst)
    diff = sorted(k for k in a if k not in ("moe", "extra") and a[k] != b[k])
    if diff:
        raise ConfigError(f"the MoE config differs from the dense one in {[(k, a[k], b[k]) for k in diff]}; "
                          f"upcycling changes only the MLPs (build it with aquila_ray.upcycle.moe_config)")
    G = moe.granularity
    if src.intermediate_size % G or dst.expert_intermediate_size != src.intermediate_size // G:
        raise ConfigError(
            f"MoEConfig.expert_intermediate_size={dst.expert_intermediate_size} must be intermediate_size / "
            f"granularity = {src.intermediate_size} / {G} (each expert is a 1/G slice of the dense MLP)")
    if moe.top_k % G:
        raise ConfigError(
            f"MoEConfig.top_k={moe.top_k} is not a multiple of granularity={G}: virtual-group routing "
            f"(2410.07524) selects whole groups of G slices; use top_k = m * {G}")


def _moe(cfg: ModelConfig) -> MoEConfig:
    if cfg.moe is None:
        raise ConfigError("the target config is dense (ModelConfig.moe is None); set moe to upcycle into")
    return cfg.moe


def router_weight(layer: int, dst: ModelConfig, seed: int) -> torch.Tensor:
    """(E, D) fp32: E/G virtual-group rows ~ N(0, router_init_std), each repeated G times."""
    moe = _moe(dst)
    gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + layer)
    rows = torch.randn(moe.num_experts // moe.granularity, dst.hidden_size, generator=gen) * moe.router_init_std
    return rows.repeat_interleave(moe.granularity, dim=0)


@dataclass(frozen=True)
class DropSpec:
    """What Drop-Upcycling needs for one layer: where its draws come from and the dense statistics."""

    layer: int
    seed: int
    mean_std: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    """(mean, std) of the dense gate_proj, up_proj and down_proj of this layer."""

    @classmethod
    def of(cls, layer: int, seed: int, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor
           ) -> DropSpec:
        g, u, d = ((float(t.double().mean()), float(t.double().std())) for t in (gate_FD, up_FD, down_DF))
        return cls(layer, seed, (g, u, d))


def expert_slice(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, expert: int,
                 dst: ModelConfig, scale: float, drop: DropSpec | None = None) -> dict[str, torch.Tensor]:
    """Expert ``expert``'s three weights: slice ``expert % G`` of the dense MLP; with ``drop`` (when
    ``MoEConfig.drop_upcycling_ratio`` > 0) its ``dropped_units`` re-drawn from the dense statistics
    (Drop-Upcycling); down_proj times ``scale``, after the re-draw, so fresh and copied units get one factor."""
    G = _moe(dst).granularity
    F_e = dst.expert_intermediate_size
    g = expert % G
    rows = slice(g * F_e, (g + 1) * F_e)
    gate, up, down = gate_FD[rows].clone(), up_FD[rows].clone(), down_DF[:, rows].contiguous().clone()
    if drop is not None:
        units = dropped_units(drop.layer, expert, dst, drop.seed)
        gen = torch.Generator().manual_seed(_drop_seed(drop.layer, expert, dst, drop.seed) + 1)
        for w, (mean, std), dim in zip((gate, up, down), drop.mean_std, (0, 0, 1), strict=True):
            shape = (len(units), w.shape[1]) if dim == 0 else (w.shape[0], len(units))
            fresh = torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean
            w.index_copy_(dim, units, fresh.to(w.dtype))
    if scale != 1.0:
        down = (down.double() * scale).to(down_DF.dtype)
    return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}


def dropped_units(layer: int, expert: int, dst: ModelConfig, seed: int) -> torch.Tensor:
    """The intermediate units (indices into the expert's F_e) that Drop-Upcycling (arXiv 2502.19261)
    re-initializes in one expert: ``round(r * F_e)`` of them, sorted, drawn from a generator of (seed, layer,
    expert) alone, so an expert-parallel rank that builds only its own experts draws the offline ones."""
    F_e = dst.expert_intermediate_size
    count = round(_moe(dst).drop_upcycling_ratio * F_e)
    gen = torch.Generator().manual_seed(_drop_seed(layer, expert, dst, seed))
    return torch.randperm(F_e, generator=gen)[:count].sort().values


def _drop_seed(layer: int, expert: int, dst: ModelConfig, seed: int) -> int:
    # one even seed per (seed, layer, expert) for the units; the odd seed after it draws their values
    return ((seed * _SEED_STRIDE + layer) * _moe(dst).num_experts + expert) * 2 + _SEED_STRIDE


def upcycle_tensors(get: Callable[[str], torch.Tensor], dense_keys: Iterable[str], src: ModelConfig,
                    dst: ModelConfig, options: UpcycleOptions = DEFAULT_OPTIONS) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (MoE key, tensor) one at a time; ``get`` reads a dense tensor by name (only those needed)."""
    check_compatible(src, dst)
    moe = _moe(dst)
    experts = range(moe.num_experts) if options.experts is None else options.experts
    bad = [e for e in experts if not 0 <= e < moe.num_experts]
    if bad:
        raise ConfigError(f"UpcycleOptions.experts has ids {bad} outside 0..{moe.num_experts - 1}")
    scale = weight_scale(dst, options)
    keys = list(dense_keys)
    for key in keys:
        if _MLP_KEY.match(key) is None:
            yield key, get(key)
    for layer in range(src.num_layers):
        p = f"layers.{layer}.mlp."
        missing = [p + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight") if p + n not in keys]
        if missing:
            raise ConfigError(f"the dense state dict lacks {missing}; is it an aquila-ray dense checkpoint?")
        dtype = get(p + "gate_proj.weight").dtype
        yield p + "router.weight", router_weight(layer, dst, options.seed).to(dtype)
        if moe.bias_update_rate > 0:  # the auxiliary-loss-free balancer starts unbiased (exactly preserving)
            yield p + "router.expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32)
        gate, up, down = get(p + "gate_proj.weight"), get(p + "up_proj.weight"), get(p + "down_proj.weight")
        F, D = src.intermediate_size, src.hidden_size
        if gate.shape != (F, D) or up.shape != (F, D) or down.shape != (D, F):
            raise ConfigError(f"layer {layer} MLP shapes {tuple(gate.shape)}, {tuple(up.shape)}, "
                              f"{tuple(down.shape)} do not match the config ({F}, {D}) / ({D}, {F})")
        drop = DropSpec.of(layer, options.seed, gate, up, down) if moe.drop_upcycling_ratio > 0 else None
        for e in experts:
            for name, t in expert_slice(gate, up, down, e, dst, scale, drop).items():
                yield f"{p}experts.{e}.{name}", t


def upcycle_state_dict(state_dict: Mapping[str, torch.Tensor], src: ModelConfig, dst: ModelConfig,
                       options: UpcycleOptions = DEFAULT_OPTIONS) -> dict[str, torch.Tensor]:
    """Offline upcycling of a whole dense state dict (every expert, or ``options.experts``)."""
    out = dict(upcycle_tensors(state_dict.__getitem__, state_dict.keys(), src, dst, options))
    moe = _moe(dst)
    n_exp = moe.num_experts if options.experts is None else len(options.experts)
    dense_mlp = sum(1 for k in state_dict if _MLP_KEY.match(k))
    router = 2 if moe.bias_update_rate > 0 else 1
    expected = len(state_dict) - dense_mlp + src.num_layers * (router + 3 * n_exp)
    if len(out) != expected or dense_mlp != 3 * src.num_layers:
        raise ConfigError(f"upcycling produced {len(out)} tensors, expected {expected}")
    return out


__all__ = [
    "DEFAULT_OPTIONS",
    "DropSpec",
    "UpcycleOptions",
    "check_compatible",
    "dropped_units",
    "exactly_preserving",
    "expert_slice",
    "moe_config",
    "renormalized",
    "router_weight",
    "upcycle_state_dict",
    "upcycle_tensors",
    "upcycled_config",
    "weight_scale",
]

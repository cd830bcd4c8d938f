"""FPI, AKI and AKI-Pro as per-tensor functions of a growth plan, and the pure state-dict transform.

Notation (DESIGN.md "Scale-Up"): weights are ``W[out, in]``; ``g`` maps target units to source units and
``c_i`` counts the copies of source unit i.

- **FPI** (Net2Net, arXiv 1511.05641; bert2BERT, ACL 2022): out-units (rows) copy their source row; fan-in
  columns of copied units are divided among the copies (``/ c``) so every sum is preserved.
- **Residual stream and RMSNorm.** ``exact`` norms: writers of the residual stream (embedding columns, o_proj
  and down_proj rows) are scaled by ``1/sqrt(c)``, readers (q/k/v/gate/up/lm_head columns) by ``1/sqrt(c)``,
  ``gamma' = gamma[g] * sqrt(D_S/D_T)`` and ``eps' = eps * D_S/D_T``. Then ``sum_j x'_j^2 = sum_i x_i^2`` and
  the grown model computes the source function at any width ratio (4096 -> 5120 included). ``paper`` norms:
  writers copy, readers ``/ c``, gamma copied; exact only when every hidden unit has the same copy count.
- **AKI** (bert2BERT): the rows of new out-units come from the (FPI-widened) same tensor of source layer
  l + 1; the top layer falls back to FPI. Norms, embedding and lm_head are FPI's.
- **AKI-Pro** (AquilaMoE, arXiv 2408.06567): AKI width + depth by interpolation (Apollo, arXiv 2401.09192);
  the query-head map is GQA compatible for every method (``aquila_ray.growth.plan``).
- **Depth**: target layer l is the widened source layer ``plan.layers[l]``; inserted identity copies get zero
  o_proj and down_proj (their block adds nothing to the residual, so depth growth stays exact).

Every target tensor is produced by ``target_tensor(plan, name, get)`` from the source tensors ``get`` returns,
so the in-memory transform (``grow_state_dict``) and the streaming checkpoint job share one code path.
Arithmetic runs in float64 for float64 weights and in float32 otherwise, then is cast back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, cast

import torch

from aquila_ray.config import ModelConfig
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.growth.plan import GrowthPlan, UnitMap, make_plan

Getter = Callable[[str], torch.Tensor]

LAYER_SUFFIXES = (
    "attn_norm.weight",
    "attn.q_proj.weight", "attn.q_proj.bias",
    "attn.k_proj.weight", "attn.k_proj.bias",
    "attn.v_proj.weight", "attn.v_proj.bias",
    "attn.o_proj.weight",
    "mlp_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def layer_suffixes(cfg: ModelConfig) -> list[str]:
    """The tensors of one dense decoder block, in forward order."""
    return [s for s in LAYER_SUFFIXES if cfg.qkv_bias or not s.endswith(".bias")]


def target_keys(cfg: ModelConfig) -> list[str]:
    """Every checkpoint key of a dense model, in forward order (no lm_head when embeddings are tied)."""
    keys = ["embed.weight"]
    for layer in range(cfg.num_layers):
        keys += [f"layers.{layer}.{s}" for s in layer_suffixes(cfg)]
    keys.append("norm.weight")
    if not cfg.tie_embeddings:
        keys.append("lm_head.weight")
    return keys


@dataclass(frozen=True)
class _Axis:
    """One dimension's map as tensors: index, per-target-unit scales, new-unit mask (expanded to rows)."""

    index: torch.Tensor | None
    """(n_T,) source index per target unit; None for the identity."""
    writer: torch.Tensor | None
    """Scale of a residual writer's rows (1/sqrt(c) exact, 1 paper); None when all ones."""
    reader: torch.Tensor | None
    """Scale of a residual reader's columns (1/sqrt(c) exact, 1/c paper); None when all ones."""
    fan_in: torch.Tensor | None
    """1/c for fan-in columns of copied units (FPI); None when all ones."""
    new: torch.Tensor
    """(n_T,) bool: new units (rows AKI takes from the layer above)."""

    def subset(self, positions: torch.Tensor) -> _Axis:
        """The axis restricted to the target units at ``positions`` (AKI builds only the new rows)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[positions]

        return _Axis(index=positions if self.index is None else self.index[positions], writer=pick(self.writer),
                     reader=pick(self.reader), fan_in=pick(self.fan_in), new=self.new[positions])


def _axis(source: list[int], num_source: int, new: list[bool], norm_mode: str, expand: int = 1) -> _Axis:
    """Build an axis; ``expand`` > 1 turns a head map into a row map (each head is ``expand`` rows)."""
    counts = torch.zeros(num_source, dtype=torch.float64)
    for s in source:
        counts[s] += 1
    src = torch.tensor(source, dtype=torch.long)
    c = counts[src]  # (n_T,) copies of each target unit's source
    identity = len(source) == num_source
    rows = (src[:, None] * expand + torch.arange(expand)).reshape(-1)
    rep = (lambda t: t.repeat_interleave(expand)) if expand > 1 else (lambda t: t)
    sqrt = rep(1.0 / c.sqrt())
    return _Axis(
        index=None if identity else rows,
        writer=None if identity or norm_mode == "paper" else sqrt,
        reader=None if identity else (sqrt if norm_mode == "exact" else rep(1.0 / c)),
        fan_in=None if identity else rep(1.0 / c),
        new=rep(torch.tensor(new, dtype=torch.bool)),
    )


@dataclass(frozen=True)
class _Axes:
    hidden: _Axis
    mlp: _Axis
    q_rows: _Axis
    kv_rows: _Axis
    gamma: float
    """sqrt(D_S/D_T) for exact norms, 1 for paper norms."""


@lru_cache(maxsize=8)
def _axes(plan: GrowthPlan) -> _Axes:
    mode = plan.options.norm_mode
    q: UnitMap = plan.query_heads()
    hd = plan.src.head_dim
    kv = plan.kv_heads
    return _Axes(
        hidden=_axis(list(plan.hidden.source), plan.hidden.num_source, plan.hidden.is_new(), mode),
        mlp=_axis(list(plan.mlp.source), plan.mlp.num_source, plan.mlp.is_new(), mode),
        q_rows=_axis(list(q.source), q.num_source, plan.new_query_heads(), mode, expand=hd),
        kv_rows=_axis(list(kv.source), kv.num_source, kv.is_new(), mode, expand=hd),
        gamma=math.sqrt(plan.src.hidden_size / plan.dst.hidden_size) if mode == "exact" else 1.0,
    )


def _take(w: torch.Tensor, dim: int, index: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """Select ``index`` along ``dim`` and multiply by ``scale`` (both optional)."""
    if index is not None:
        w = w.index_select(dim, index)
    if scale is not None:
        s = scale.to(w.dtype)
        s = s[:, None] if dim == 0 and w.dim() == 2 else s
        w = w.mul_(s) if index is not None else w * s  # in place only on our own copy
    return w


def _widen(a: _Axes, suffix: str, w: torch.Tensor) -> torch.Tensor:
    """FPI width growth of one block tensor (compute dtype in, compute dtype out)."""
    h = a.hidden
    if suffix.endswith("norm.weight"):
        w = _take(w, 0, h.index, None)
        return w * a.gamma if a.gamma != 1.0 else w
    if suffix.startswith("attn.") and suffix.endswith(".bias"):
        rows = a.q_rows if suffix.startswith("attn.q_proj") else a.kv_rows
        return _take(w, 0, rows.index, None)
    if suffix in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"):
        rows = a.q_rows if suffix.startswith("attn.q_proj") else a.kv_rows
        return _take(_take(w, 0, rows.index, None), 1, h.index, h.reader)
    if suffix == "attn.o_proj.weight":
        return _take(_take(w, 0, h.index, h.writer), 1, a.q_rows.index, a.q_rows.fan_in)
    if suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return _take(_take(w, 0, a.mlp.index, None), 1, h.index, h.reader)
    if suffix == "mlp.down_proj.weight":
        return _take(_take(w, 0, h.index, h.writer), 1, a.mlp.index, a.mlp.fan_in)
    raise KeyError(f"no growth rule for block tensor {suffix!r}")


def _row_axis(suffix: str) -> str | None:
    """The ``_Axes`` field of a block tensor's out-units (rows AKI takes from the layer above); None when the
    tensor has no out-units of its own to fill (norms)."""
    if suffix.startswith("attn.q_proj"):
        return "q_rows"
    if suffix.startswith(("attn.k_proj", "attn.v_proj")):
        return "kv_rows"
    if suffix in ("attn.o_proj.weight", "mlp.down_proj.weight"):
        return "hidden"
    if suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return "mlp"
    return None


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def source_keys_for(plan: GrowthPlan, name: str) -> list[str]:
    """The source tensors ``target_tensor(plan, name, ...)`` reads (for streaming and caching)."""
    m = _LAYER_KEY.fullmatch(name)
    if m is None:
        if name == "lm_head.weight" and plan.src.tie_embeddings:
            return ["embed.weight"]
        return [name]
    layer, suffix = int(m.group(1)), m.group(2)
    s = plan.layers[layer]
    keys = [f"layers.{s}.{suffix}"]
    if plan.options.method != "fpi" and s + 1 < plan.src.num_layers and _row_axis(suffix) is not None:
        keys.append(f"layers.{s + 1}.{suffix}")
    return keys


def target_tensor(plan: GrowthPlan, name: str, get: Getter) -> torch.Tensor:
    """The grown model's tensor ``name``, built from the source tensors ``get(key)`` returns."""
    a = _axes(plan)
    m = _LAYER_KEY.fullmatch(name)
    src_key = source_keys_for(plan, name)[0]
    w0 = get(src_key)
    dtype = w0.dtype
    w = w0.to(_compute_dtype(w0))
    if m is None:
        h = a.hidden
        if name == "embed.weight":
            out = _take(w, 1, h.index, h.writer)
        elif name == "lm_head.weight":
            out = _take(w, 1, h.index, h.reader)
        elif name == "norm.weight":
            out = _take(w, 0, h.index, None)
            out = out * a.gamma if a.gamma != 1.0 else out
        else:
            raise KeyError(f"no growth rule for tensor {name!r}")
        return _fresh(out.to(dtype), w0)
    layer, suffix = int(m.group(1)), m.group(2)
    if plan.inserted[layer] and suffix in ("attn.o_proj.weight", "mlp.down_proj.weight"):
        shape = (plan.dst.hidden_size, plan.dst.num_heads * plan.dst.head_dim if "o_proj" in suffix
                 else plan.dst.intermediate_size)
        return torch.zeros(shape, dtype=dtype)
    out = _widen(a, suffix, w)
    above = source_keys_for(plan, name)[1:]
    if above:  # AKI: new out-units from the layer above; only those rows of it are built
        field = _row_axis(suffix)
        assert field is not None
        rows: _Axis = getattr(a, field)
        new = rows.new.nonzero().squeeze(1)
        if len(new):
            up = get(above[0])
            only_new = replace(a, **cast(dict[str, Any], {field: rows.subset(new)}))
            out.index_copy_(0, new, _widen(only_new, suffix, up.to(_compute_dtype(up))))
    return _fresh(out.to(dtype), w0)


def _fresh(out: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Never hand out the source's storage (identity maps): outputs are independent tensors."""
    return out.clone() if out.data_ptr() == source.data_ptr() else out


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every key in ``target_keys(cfg)``."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer: dict[str, tuple[int, ...]] = {
        "attn_norm.weight": (d,), "attn.q_proj.weight": (q, d), "attn.q_proj.bias": (q,),
        "attn.k_proj.weight": (kv, d), "attn.k_proj.bias": (kv,), "attn.v_proj.weight": (kv, d),
        "attn.v_proj.bias": (kv,), "attn.o_proj.weight": (d, q), "mlp_norm.weight": (d,),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d), "norm.weight": (d,),
                                          "lm_head.weight": (cfg.vocab_size, d)}
    out = {}
    for k in target_keys(cfg):
        m = _LAYER_KEY.fullmatch(k)
        out[k] = per_layer[m.group(2)] if m else shapes[k]
    return out


def grow_state_dict(state_dict: Mapping[str, torch.Tensor], src: ModelConfig, dst: ModelConfig,
                    options: GrowthConfig, plan: GrowthPlan | None = None) -> dict[str, torch.Tensor]:
    """The pure transform: a source state dict in, the grown state dict out (inputs are not modified).

    ``dst`` is the target shape; the returned weights belong to ``plan.dst`` (``make_plan(src, dst,
    options).dst``: the same shape with the derived rms_norm_eps). ``lm_head.weight`` is left out when
    embeddings are tied; a tied source may include or omit it.
    """
    plan = plan or make_plan(src, dst, options)
    expected_src = target_shapes(src)
    got = {k: tuple(v.shape) for k, v in state_dict.items() if not (src.tie_embeddings and k == "lm_head.weight")}
    assert got == expected_src, f"source state dict does not match its config: {set(got) ^ set(expected_src)}"
    out = {k: target_tensor(plan, k, state_dict.__getitem__) for k in target_keys(plan.dst)}
    expected = target_shapes(plan.dst)
    assert len(out) == len(expected) and all(tuple(v.shape) == expected[k] for k, v in out.items())
    return out

"""The growth plan: where every unit of the grown model comes from, decided once, seeded, inspectable.

A plan maps each target unit to a source unit (``g`` in Net2Net, arXiv 1511.05641, and bert2BERT, ACL
2022): the hidden (residual) units, the MLP units, the KV heads, the query-head slots of each KV group, and
the layers. The first n_S units of every map are the identity, so the original units keep their place.
Query heads grow within their KV group (AquilaMoE, arXiv 2408.06567, "GQA compatibility"): target head
``k * G_T + i`` copies source head ``kv[k] * G_S + slot_k[i]``, so it keeps reading a copy of the KV head it
read before. Depth maps follow Apollo (arXiv 2401.09192, interpolation) or bert2BERT (stacking).

``validate_growth`` rejects every target the transforms cannot serve, before any compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from aquila_ray.config import ModelConfig, to_dict
from aquila_ray.config.growth import DepthMode, GrowthConfig, MapKind
from aquila_ray.errors import ConfigError


@dataclass(frozen=True)
class UnitMap:
    """One dimension's map: ``source[j]`` is the source unit target unit j copies (n_S -> n_T)."""

    num_source: int
    source: tuple[int, ...]

    @staticmethod
    def grow(num_source: int, num_target: int, kind: MapKind, gen: torch.Generator) -> UnitMap:
        """Identity on the first ``num_source`` units; new unit j copies j mod n_S (circular) or a uniform
        random source unit (random, drawn from ``gen``)."""
        new = range(num_source, num_target)
        if kind == "circular":
            extra = [j % num_source for j in new]
        else:
            extra = torch.randint(0, num_source, (len(new),), generator=gen).tolist()
        return UnitMap(num_source, tuple(range(num_source)) + tuple(extra))

    @property
    def num_target(self) -> int:
        return len(self.source)

    @property
    def is_identity(self) -> bool:
        return self.num_target == self.num_source

    def counts(self) -> list[int]:
        """Copies of each source unit in the target (c_i >= 1)."""
        c = [0] * self.num_source
        for s in self.source:
            c[s] += 1
        return c

    def is_new(self) -> list[bool]:
        """True for target units beyond the originals."""
        return [j >= self.num_source for j in range(self.num_target)]

    def summary(self) -> dict[str, Any]:
        """Compact description: sizes, the copy-count histogram, the first new units' sources."""
        hist = Counter(self.counts())
        return {"from": self.num_source, "to": self.num_target,
                "copy_counts": {str(k): v for k, v in sorted(hist.items())},
                "new_units_copy": list(self.source[self.num_source:self.num_source + 8])
                + (["..."] if self.num_target - self.num_source > 8 else [])}


def layer_map(num_source: int, num_target: int, depth_mode: DepthMode) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """(source layer of each target layer, whether it is an inserted identity copy).

    interpolate and identity: ``(l * L_S) // L_T`` (Apollo; 3 -> 6 gives [0, 0, 1, 1, 2, 2], 32 -> 40 repeats
    layers 0, 4, ..., 28); stack: ``l mod L_S`` (bert2BERT). In identity mode every occurrence of a source
    layer after its first is inserted (its o_proj and down_proj are zeroed, so the block adds nothing).
    """
    if depth_mode == "stack":
        layers = tuple(t % num_source for t in range(num_target))
    else:
        layers = tuple((t * num_source) // num_target for t in range(num_target))
    seen: set[int] = set()
    inserted = []
    for s in layers:
        inserted.append(depth_mode == "identity" and s in seen)
        seen.add(s)
    return layers, tuple(inserted)


def validate_growth(src: ModelConfig, dst: ModelConfig, options: GrowthConfig) -> None:
    """Raise a ConfigError naming the field, both values and what is valid, if ``src`` cannot grow into ``dst``."""
    if src.moe is not None or dst.moe is not None:
        raise ConfigError("growth works on dense models: source moe="
                          f"{'set' if src.moe else 'null'}, target moe={'set' if dst.moe else 'null'}; grow the "
                          "dense model first, then upcycle it (python -m jobs.scale_out)")
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
        a, b = getattr(src, name), getattr(dst, name)
        if b < a:
            raise ConfigError(f"target {name}={b} is smaller than the source's {a}; growth never shrinks a "
                              f"dimension (set {name} >= {a})")
    if dst.head_dim != src.head_dim:
        raise ConfigError(
            f"target head_dim={dst.head_dim} (hidden_size {dst.hidden_size} / num_heads {dst.num_heads}) differs "
            f"from the source's head_dim={src.head_dim}; heads grow as whole heads, so set num_heads = "
            f"hidden_size / {src.head_dim}" + (f" = {dst.hidden_size // src.head_dim}"
                                                if dst.hidden_size % src.head_dim == 0 else
                                                f" (and hidden_size a multiple of {src.head_dim})"))
    for name in ("vocab_size", "rope_theta", "qkv_bias", "tie_embeddings"):
        a, b = getattr(src, name), getattr(dst, name)
        if a != b:
            what = {"vocab_size": "the vocabulary (tokenizer) is fixed", "rope_theta": "RoPE settings are fixed",
                    "qkv_bias": "the attention layout is fixed", "tie_embeddings": "the embedding layout is fixed"}
            raise ConfigError(f"target {name}={b!r} differs from the source's {a!r}; {what[name]} under growth "
                              f"(set {name}={a!r})")
    if dst.num_kv_heads % src.num_kv_heads:
        raise ConfigError(
            f"target num_kv_heads={dst.num_kv_heads} is not a multiple of the source's {src.num_kv_heads}: the "
            f"KV heads would not tile whole groups (each source KV group must map to whole target groups); valid: "
            f"{src.num_kv_heads}, {2 * src.num_kv_heads}, ...")
    if dst.kv_group_size < src.kv_group_size:
        raise ConfigError(
            f"target num_heads/num_kv_heads={dst.num_heads}/{dst.num_kv_heads} gives {dst.kv_group_size} query "
            f"heads per KV group, fewer than the source's {src.kv_group_size}; query heads grow within their "
            f"group, so set num_heads >= {src.kv_group_size} * num_kv_heads")
    if options.method == "aki-pro" and dst.num_kv_heads != src.num_kv_heads:
        raise ConfigError(
            f"method='aki-pro' keeps the number of KV groups, but target num_kv_heads={dst.num_kv_heads} differs "
            f"from the source's {src.num_kv_heads}; set num_kv_heads={src.num_kv_heads} (grow num_heads instead) "
            f"or use method='fpi'/'aki'")


def grown_config(src: ModelConfig, dst: ModelConfig, options: GrowthConfig) -> ModelConfig:
    """The config the grown checkpoint carries: ``dst`` with ``rms_norm_eps`` derived from the source.

    Exact norms need eps' = eps * D_S / D_T (the grown residual's mean square is D_S/D_T of the source's);
    paper norms keep the source's eps. ``extra`` records the growth provenance.
    """
    eps = src.rms_norm_eps * (src.hidden_size / dst.hidden_size if options.norm_mode == "exact" else 1.0)
    extra = dict(dst.extra)
    extra.update({"grown_from_hidden_size": float(src.hidden_size), "grown_from_num_layers": float(src.num_layers)})
    return dataclasses.replace(dst, rms_norm_eps=eps, extra=extra)


@dataclass(frozen=True, eq=False)  # hashed by identity: transforms cache their index tensors per plan
class GrowthPlan:
    """Every map a growth needs; built by ``make_plan``, applied by ``aquila_ray.growth.transform``."""

    src: ModelConfig
    dst: ModelConfig
    """The grown model's config (``grown_config``: rms_norm_eps derived, provenance in extra)."""
    options: GrowthConfig
    hidden: UnitMap
    """Residual-stream units D_S -> D_T."""
    mlp: UnitMap
    """MLP units F_S -> F_T."""
    kv_heads: UnitMap
    """KV heads K_S -> K_T."""
    query_slots: tuple[UnitMap, ...]
    """Per target KV group: its query-head slots G_S -> G_T."""
    layers: tuple[int, ...]
    """Source layer of each target layer."""
    inserted: tuple[bool, ...]
    """Target layers that are inserted identity copies (zeroed o_proj and down_proj)."""

    @property
    def depth_mode(self) -> DepthMode:
        return self.options.resolved_depth_mode

    def query_heads(self) -> UnitMap:
        """The flat query-head map H_S -> H_T (target head k * G_T + i)."""
        g_s = self.src.kv_group_size
        source = tuple(self.kv_heads.source[k] * g_s + s
                       for k, slots in enumerate(self.query_slots) for s in slots.source)
        return UnitMap(self.src.num_heads, source)

    def new_query_heads(self) -> list[bool]:
        """Target query heads that are not original heads in their original group."""
        kv_new = self.kv_heads.is_new()
        return [kv_new[k] or n for k, slots in enumerate(self.query_slots) for n in slots.is_new()]

    def summary(self) -> dict[str, Any]:
        """What ``--dry-run`` prints and ``growth_report.json`` keeps: shapes, counts, maps."""
        s, d = self.src, self.dst
        return {
            "method": self.options.method,
            "depth_mode": self.depth_mode,
            "norm_mode": self.options.norm_mode,
            "map": self.options.map,
            "seed": self.options.seed,
            "source": {"shape": _shape(s), "parameters": s.num_params()},
            "target": {"shape": _shape(d), "parameters": d.num_params()},
            "rms_norm_eps": [s.rms_norm_eps, d.rms_norm_eps],
            "hidden_map": self.hidden.summary(),
            "mlp_map": self.mlp.summary(),
            "kv_head_map": list(self.kv_heads.source),
            "query_head_map_per_group": [list(m.source) for m in self.query_slots],
            "query_head_map": list(self.query_heads().source),
            "layer_map": list(self.layers),
            "inserted_identity_layers": [i for i, ins in enumerate(self.inserted) if ins],
        }


def _shape(c: ModelConfig) -> dict[str, int]:
    return {"num_layers": c.num_layers, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "vocab_size": c.vocab_size}


def make_plan(src: ModelConfig, dst: ModelConfig, options: GrowthConfig) -> GrowthPlan:
    """Validate, then draw every map (deterministic for ``options.seed``)."""
    validate_growth(src, dst, options)
    gen = torch.Generator().manual_seed(options.seed)
    kind = options.map
    hidden = UnitMap.grow(src.hidden_size, dst.hidden_size, kind, gen)
    mlp = UnitMap.grow(src.intermediate_size, dst.intermediate_size, kind, gen)
    kv = UnitMap.grow(src.num_kv_heads, dst.num_kv_heads, kind, gen)
    slots = tuple(UnitMap.grow(src.kv_group_size, dst.kv_group_size, kind, gen) for _ in range(dst.num_kv_heads))
    layers, inserted = layer_map(src.num_layers, dst.num_layers, options.resolved_depth_mode)
    plan = GrowthPlan(src=src, dst=grown_config(src, dst, options), options=options, hidden=hidden, mlp=mlp,
                      kv_heads=kv, query_slots=slots, layers=layers, inserted=inserted)
    _check_plan(plan)
    return plan


def _check_plan(plan: GrowthPlan) -> None:
    # Internal invariants (not user input): every source unit survives, heads stay in their KV group.
    for m in (plan.hidden, plan.mlp, plan.kv_heads, *plan.query_slots):
        assert min(m.counts()) >= 1 and m.source[: m.num_source] == tuple(range(m.num_source))
    q = plan.query_heads()
    g_s, g_t = plan.src.kv_group_size, plan.dst.kv_group_size
    assert q.num_target == plan.dst.num_heads
    assert all(plan.kv_heads.source[h // g_t] == s // g_s for h, s in enumerate(q.source))
    assert len(plan.layers) == plan.dst.num_layers and math.isfinite(plan.dst.rms_norm_eps)


def plan_to_dict(plan: GrowthPlan) -> dict[str, Any]:
    """The full plan (every map in full), JSON-ready."""
    return {"src": to_dict(plan.src), "dst": to_dict(plan.dst), "options": to_dict(plan.options),
            "hidden": list(plan.hidden.source), "mlp": list(plan.mlp.source), "kv_heads": list(plan.kv_heads.source),
            "query_slots": [list(m.source) for m in plan.query_slots], "layers": list(plan.layers),
            "inserted": list(plan.inserted)}

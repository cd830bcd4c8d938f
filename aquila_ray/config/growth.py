"""Scale-Up (model growth) settings: which method grows the model and how (aquila_ray.growth).

Methods: FPI (function-preserving initialization; Net2Net, arXiv 1511.05641, and bert2BERT, ACL 2022),
AKI (bert2BERT's advanced knowledge initialization) and AKI-Pro (AquilaMoE, arXiv 2408.06567: AKI + depth
by interpolation as in Apollo, arXiv 2401.09192, + GQA compatibility). The math is in DESIGN.md "Scale-Up".
A recipe holds one as its ``growth`` (``aquila_ray.config.recipe.RecipeConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from aquila_ray.errors import ConfigError

GrowthMethod = Literal["fpi", "aki", "aki-pro"]
DepthMode = Literal["interpolate", "stack", "identity"]
NormMode = Literal["exact", "paper"]
MapKind = Literal["circular", "random"]

#: The depth mode each method uses when ``depth_mode`` is None (AquilaMoE: AKI stacks, AKI-Pro interpolates).
DEFAULT_DEPTH: dict[str, DepthMode] = {"fpi": "interpolate", "aki": "stack", "aki-pro": "interpolate"}


@dataclass
class GrowthConfig:
    """How a small dense checkpoint grows into a larger one (the target shape is a ModelConfig)."""

    method: GrowthMethod = "aki-pro"
    """fpi: function preserving (new units copy source units, fan-in split among copies); aki: bert2BERT's
    advanced knowledge init (new out-units from the layer above, the top layer falls back to FPI);
    aki-pro: AKI with depth by interpolation and the number of KV groups kept (AquilaMoE)."""
    depth_mode: DepthMode | None = None
    """interpolate: target layer l copies source layer (l * L_S) // L_T (Apollo); stack: l mod L_S
    (bert2BERT); identity: interpolation positions, but every inserted copy gets zero o_proj and down_proj,
    so depth growth is exact. None: the method's own (fpi and aki-pro interpolate, aki stacks)."""
    norm_mode: NormMode = "exact"
    """exact: sqrt-split rescaling of residual writers and readers, gamma' = gamma * sqrt(D_S/D_T) and
    eps' = eps * D_S/D_T (exact at any width ratio); paper: plain 1/c fan-in splitting and copied gamma
    (exact only when every hidden unit has the same number of copies)."""
    map: MapKind = "circular"
    """How a new unit picks its source unit: circular (j mod n_S, equal copy counts at integer ratios) or
    random (uniform, seeded; bert2BERT's choice)."""
    seed: int = 0
    """Seeds the random maps and the probe batch."""
    probe: bool = True
    """Measure function preservation (max |logit diff|, loss before/after) on a probe batch after growing."""
    probe_batch: int = 2
    """Sequences in the probe batch."""
    probe_seq_len: int = 32
    """Tokens per probe sequence (capped at the model's max_seq_len)."""

    def __post_init__(self) -> None:
        for name, tp in (("method", GrowthMethod), ("norm_mode", NormMode), ("map", MapKind)):
            value = getattr(self, name)
            if value not in get_args(tp):
                raise ConfigError(f"GrowthConfig.{name}={value!r} is not valid; choose one of {list(get_args(tp))}")
        if self.depth_mode is not None and self.depth_mode not in get_args(DepthMode):
            raise ConfigError(f"GrowthConfig.depth_mode={self.depth_mode!r} is not valid; choose one of "
                              f"{list(get_args(DepthMode))} or null (the method's default)")
        for name in ("probe_batch", "probe_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GrowthConfig.{name}={value!r} must be a positive integer")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"GrowthConfig.seed={self.seed!r} must be a non-negative integer")

    @property
    def resolved_depth_mode(self) -> DepthMode:
        """The depth mode that runs: ``depth_mode``, or the method's default."""
        return self.depth_mode if self.depth_mode is not None else DEFAULT_DEPTH[self.method]


@dataclass
class ScaleUpConfig:
    """The ``jobs.scale_up`` run: growth options, the target shape, and where the Ray task runs."""

    growth: GrowthConfig = field(default_factory=GrowthConfig)
    """Method and options."""
    target_preset: str | None = None
    """Target shape from the preset registry; None starts from the source's own config. The vocabulary size
    is always the source's (it comes from the tokenizer, not the preset)."""
    target: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields set on top of the preset (e.g. hidden_size, num_layers); unnamed dims stay."""
    max_shard_bytes: int = 2 * 1024**3
    """Largest output safetensors shard."""
    num_cpus: float = 1.0
    """CPUs the Ray task asks for."""
    memory_bytes: int | None = None
    """Memory the Ray task asks for (so a cluster places it on a node that has it); None: estimated from
    the plan (two source blocks, one target block, the embedding tables, one shard)."""
    local: bool = False
    """Run in this process instead of as a Ray task."""

    def __post_init__(self) -> None:
        if isinstance(self.growth, dict):
            self.growth = GrowthConfig(**self.growth)
        if not isinstance(self.max_shard_bytes, int) or self.max_shard_bytes <= 0:
            raise ConfigError(f"ScaleUpConfig.max_shard_bytes={self.max_shard_bytes!r} must be a positive integer")
        if self.num_cpus <= 0:
            raise ConfigError(f"ScaleUpConfig.num_cpus={self.num_cpus} must be > 0")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ConfigError(f"ScaleUpConfig.memory_bytes={self.memory_bytes} must be > 0, or null to estimate it")

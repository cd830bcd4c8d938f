"""The EfficientScale recipe as a typed config: models, transforms and one training setting per stage.

``RECIPES`` is the index: ``tiny`` (the CPU quickstart, minutes on 2 cores) and ``aquila3-efficientscale``
(the seed's 7B -> 16B -> 8x16B run: AKI-Pro growth, 8 experts top-2, LR 1.2e-3 / 4e-4 / 1.5e-4, batch
12M / 12M / 24M tokens, 3.6T / 1.2T / 545B tokens), which only plans here (``--dry-run``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aquila_ray.config.base import apply_overrides, from_dict, load_overlay, merge_overlay, to_dict
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.config.model import ModelConfig, MoEConfig
from aquila_ray.config.presets import get_preset
from aquila_ray.config.train import ACTIVATION_CHECKPOINTING, model_from_overlay
from aquila_ray.errors import ConfigError


@dataclass
class StageConfig:
    """One pretraining stage of the recipe (small dense, large dense, or MoE)."""

    steps: int = 100
    """Optimizer steps this stage runs."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warmup."""
    global_batch_tokens: int = 4096
    """Tokens per optimizer step over all workers (a multiple of seq_len)."""
    micro_batch_size: int = 8
    """Sequences per worker per forward/backward; gradient accumulation makes up the rest."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""
    planned_tokens: float | None = None
    """The stage's token budget in the seed's run, for plans; None means steps * global_batch_tokens."""
    num_workers: int = 1
    """Ray Train workers (one GPU each on GPU clusters)."""
    use_gpu: bool = False
    """Give each worker a GPU (bf16); CPU workers train in fp32."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (1 or 2)."""
    expert_parallel: int = 1
    """Expert-parallel size for MoE stages; divides num_workers and the number of experts."""
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end)."""
    checkpoint_every: int = 50
    """Register a checkpoint with Ray Train every N steps (and at the end)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """TrainConfig.activation_checkpointing of the stage: none, full or selective."""
    max_failures: int = 3
    """Worker-group restarts Ray Train allows in this stage (-1: unlimited, for long stages on spot nodes)."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_tokens", "micro_batch_size", "num_workers", "expert_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"StageConfig.{name}={v!r} must be a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"StageConfig.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"StageConfig.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError(f"StageConfig.max_failures={self.max_failures!r} must be an integer >= 0, or -1 for "
                              f"unlimited restarts")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"StageConfig.zero_stage={self.zero_stage} is not valid; choose 0, 1 or 2")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(f"StageConfig.activation_checkpointing={self.activation_checkpointing!r} is not "
                              f"valid; choose one of {list(ACTIVATION_CHECKPOINTING)}")

    def tokens(self) -> float:
        return self.planned_tokens if self.planned_tokens is not None else float(self.steps * self.global_batch_tokens)


@dataclass
class RecipeConfig:
    """The whole EfficientScale run."""

    small: ModelConfig = field(default_factory=lambda: get_preset("tiny"))
    """The small dense model trained first (vocab_size is taken from the tokenizer)."""
    large: ModelConfig = field(default_factory=lambda: get_preset("tiny-large"))
    """The Scale-Up target (same vocabulary, head_dim, KV heads and RoPE as small)."""
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    """Scale-Up method and options (``jobs.grow``'s config; its ``seed`` seeds the random maps and probe)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Scale-Out: experts, top-k, router init, loss coefficients."""
    upcycle: Literal["offline", "online"] = "offline"
    """offline: a Ray task writes the MoE checkpoint; online: each MoE worker builds its experts itself."""
    stage_small: StageConfig = field(default_factory=StageConfig)
    """Training of the small dense model."""
    stage_large: StageConfig = field(default_factory=StageConfig)
    """Continued pretraining after Scale-Up."""
    stage_moe: StageConfig = field(default_factory=StageConfig)
    """Continued pretraining after Scale-Out."""
    data_dir: str | None = None
    """A prepared data directory to reuse; None runs prepare_data on the bundled sample corpus into DIR/data."""
    data_overrides: list[str] = field(default_factory=list)
    """``field=value`` overrides for the data job when it runs (e.g. pack.seq_len=256)."""
    eval_tasks: str | None = "sample"
    """Multiple-choice JSONL scored by each stage's workers after its last step; "sample" is the bundled cloze
    task, None skips it."""
    eval_max_sequences: int | None = None
    """Cap on validation sequences per evaluation (None: the whole split, within ``eval_tokens``)."""
    eval_tokens: int | None = 10_000_000
    """Token budget of one validation pass (``TrainConfig.eval_tokens``)."""
    seed: int = 0
    """Seeds model init, data order and the router (`growth.seed` seeds the growth's random maps and probe)."""
    wandb_project: str = "aquila-ray"
    """W&B project; every stage logs to one W&B group named after the run."""

    def __post_init__(self) -> None:
        if self.small.moe is not None or self.large.moe is not None:
            raise ConfigError("RecipeConfig.small and .large must be dense models (moe: null); the MoE shape comes "
                              "from RecipeConfig.moe")
        for name in ("eval_tokens", "eval_max_sequences"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"RecipeConfig.{name}={value!r} must be a positive integer or null")


def tiny_recipe() -> RecipeConfig:
    """The quickstart: tiny (d64, 2 layers) -> tiny-large (d80, 4 layers) -> 8x top-2 MoE, on the sample
    corpus, on CPU. Exact FPI growth so the transition shows function preservation; switch with
    ``--set growth.method=aki-pro``."""
    stage = dict(lr=3e-3, warmup_steps=10, global_batch_tokens=16 * 128, micro_batch_size=16, checkpoint_every=50,
                 eval_every=0, num_workers=1)
    return RecipeConfig(
        small=get_preset("tiny"),
        large=get_preset("tiny-large"),
        growth=GrowthConfig(method="fpi", depth_mode="identity", norm_mode="exact"),
        moe=MoEConfig(num_experts=8, top_k=2),
        stage_small=StageConfig(steps=150, **stage),  # type: ignore[arg-type]
        stage_large=StageConfig(steps=100, **{**stage, "lr": 2e-3}),  # type: ignore[arg-type]
        stage_moe=StageConfig(steps=100, **{**stage, "lr": 2e-3}),  # type: ignore[arg-type]
        eval_max_sequences=64,
    )


def aquila3_recipe() -> RecipeConfig:
    """The seed's recipe (DESIGN.md table). Worker counts are our planning assumption (one GPU each), not the
    paper's; set your own. Scale-Out runs online (no 200 GB intermediate MoE checkpoint). ZeRO-2 everywhere
    (ZeRO-1 would keep 6 bytes of bf16 + fp32-accumulated gradients per parameter on every GPU: 97 GB for
    16B); activation checkpointing where 4k-context activations would not fit 80 GB: selective for 16B
    dense, full for 8x16B (docs/efficientscale.md, the memory plan)."""
    seq = 4096
    small_batch, moe_batch = 12_582_912 // seq * seq, 25_165_824 // seq * seq
    # steps x batch = the seed's token budgets (3.6T / 1.2T / 545B) to 1e-6; spot GPU nodes come and go over
    # weeks, so every stage restarts without limit (from its last checkpoint)
    return RecipeConfig(
        small=get_preset("aquila3-7b"),
        large=get_preset("aquila3-16b"),
        growth=GrowthConfig(method="aki-pro"),
        moe=MoEConfig(num_experts=8, top_k=2, aux_loss_coeff=0.001, z_loss_coeff=0.01),
        upcycle="online",
        stage_small=StageConfig(steps=round(3.6e12 / small_batch), lr=1.2e-3, global_batch_tokens=small_batch,
                                micro_batch_size=1, planned_tokens=3.6e12, num_workers=64, use_gpu=True,
                                zero_stage=2, warmup_steps=2000, checkpoint_every=1000, max_failures=-1),
        stage_large=StageConfig(steps=round(1.2e12 / small_batch), lr=4e-4, global_batch_tokens=small_batch,
                                micro_batch_size=1, planned_tokens=1.2e12, num_workers=128, use_gpu=True,
                                zero_stage=2, activation_checkpointing="selective", warmup_steps=1000,
                                checkpoint_every=1000, max_failures=-1),
        stage_moe=StageConfig(steps=round(545e9 / moe_batch), lr=1.5e-4, global_batch_tokens=moe_batch,
                              micro_batch_size=1, planned_tokens=545e9, num_workers=256, use_gpu=True,
                              zero_stage=2, expert_parallel=8, activation_checkpointing="full", warmup_steps=500,
                              checkpoint_every=500, max_failures=-1),
        eval_tasks=None,
    )


RECIPES: dict[str, Callable[[], RecipeConfig]] = {
    "tiny": tiny_recipe,
    "aquila3-efficientscale": aquila3_recipe,
}


def get_recipe(name: str) -> RecipeConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe preset {name!r}; valid presets: {sorted(RECIPES)}")
    return RECIPES[name]()




def _models_as_dicts(data: dict[str, Any]) -> dict[str, Any]:
    """``small``/``large`` given as a preset name or ``{preset: NAME, ...}`` become full field mappings."""
    for key in ("small", "large"):
        value = data.get(key)
        if isinstance(value, str) or (isinstance(value, dict) and "preset" in value):
            data[key] = to_dict(model_from_overlay(value))
    return data


def build_recipe_config(preset: str = "tiny", overlay: dict[str, Any] | str | Path | None = None,
                        overrides: list[str] | None = None) -> RecipeConfig:
    """A recipe preset <- a YAML/JSON overlay <- ``a.b=value`` overrides (``--set stage_moe.steps=50``,
    ``--set large=demo-large``). Unknown fields and invalid values raise a ConfigError before any work."""
    data = to_dict(get_recipe(preset))
    if overlay is not None:
        extra = load_overlay(overlay) if isinstance(overlay, (str, Path)) else dict(overlay)
        data = merge_overlay(data, _models_as_dicts(extra))
    plain: list[str] = []
    for o in overrides or []:
        key, _, value = o.partition("=")
        if key.strip() in ("small", "large"):
            data[key.strip()] = to_dict(model_from_overlay(value.strip()))
        else:
            plain.append(o)
    cfg = from_dict(RecipeConfig, data)
    return apply_overrides(cfg, plain) if plain else cfg

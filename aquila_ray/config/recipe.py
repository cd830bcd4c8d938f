"""The EfficientScale recipe as a typed config: models, transforms, and each stage's TrainConfig as an overlay
(``train`` for what every stage shares, ``stage_small`` / ``stage_large`` / ``stage_moe`` for what one changes).

``RECIPES`` is the index: ``tiny`` (the CPU quickstart, minutes on 2 cores) and ``aquila3-efficientscale``
(the seed's 7B -> 16B -> 8x16B run: AKI-Pro growth, 8 experts top-2, LR 1.2e-3 / 4e-4 / 1.5e-4, batch
12M / 12M / 24M tokens, 3.6T / 1.2T / 545B tokens), which only plans here (``--dry-run``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aquila_ray.config.base import from_dict, from_registry, merge_overlay, preset_field, resolve, to_dict
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.config.model import ModelConfig, MoEConfig
from aquila_ray.config.presets import get_moe_preset, get_preset
from aquila_ray.config.train import TrainConfig
from aquila_ray.errors import ConfigError

STAGE_NAMES = ("data", "train_small", "scale_up", "train_large", "scale_out", "train_moe", "evaluate")
"""The recipe's stages, in order (``aquila_ray.pipeline.efficientscale`` runs them)."""
STAGE_FIELDS = {"train_small": "stage_small", "train_large": "stage_large", "train_moe": "stage_moe"}
"""The training stages and the RecipeConfig field holding each one's TrainConfig overlay."""
SET_BY_RECIPE = ("model", "data_dir", "init", "init_from", "data_start", "seed")
"""TrainConfig fields the recipe sets for each stage (from small/large/scale_out, the data, the previous stage,
the recipe's seed); an overlay that names one is an error."""


@dataclass
class ScaleOutConfig:
    """Scale-Out: the MoE's shape and routing, and where upcycling runs."""

    moe: MoEConfig = preset_field(get_moe_preset, "aquilamoe")
    """Experts, top-k, granularity, router init and order, loss coefficients (experts are F / granularity
    wide; the upcycled model takes every other dimension from the grown dense model). Also a name of
    ``MOE_PRESETS`` (``aquilamoe``, ``fine-grained-drop``), or ``{preset: NAME, field: value}``."""
    mode: Literal["offline", "online"] = "offline"
    """offline: a Ray task writes the MoE checkpoint; online: each MoE worker builds its experts itself (no
    intermediate MoE checkpoint)."""


@dataclass
class RecipeConfig:
    """The whole EfficientScale run."""

    small: ModelConfig = preset_field(get_preset, "tiny")
    """The small dense model trained first (vocab_size is taken from the tokenizer)."""
    large: ModelConfig = preset_field(get_preset, "tiny-large")
    """The Scale-Up target (same vocabulary, head_dim, KV heads and RoPE as small)."""
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    """Scale-Up method and options (``jobs.grow``'s config; its ``seed`` seeds the random maps and probe)."""
    scale_out: ScaleOutConfig = field(default_factory=ScaleOutConfig)
    """Scale-Out: the MoE shape and routing, offline or online upcycling (the router seed is ``seed``)."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields every stage shares (an overlay on TrainConfig's defaults, e.g. ``{scaling:
    {use_gpu: true}, eval_tasks: sample}``); the fields in ``SET_BY_RECIPE`` come from the recipe."""
    stage_small: dict[str, Any] = field(default_factory=dict)
    """The small dense model's training: TrainConfig fields it changes on top of ``train`` (``{steps: 150,
    optimizer: {lr: 3.0e-3}}``)."""
    stage_large: dict[str, Any] = field(default_factory=dict)
    """Continued pretraining after Scale-Up: TrainConfig fields it changes on top of ``train``."""
    stage_moe: dict[str, Any] = field(default_factory=dict)
    """Continued pretraining after Scale-Out: TrainConfig fields it changes on top of ``train``."""
    data_dir: str | None = None
    """A prepared data directory to reuse; None runs prepare_data on the bundled sample corpus into DIR/data."""
    data_overrides: list[str] = field(default_factory=list)
    """``field=value`` overrides for the data job when it runs (e.g. pack.seq_len=256)."""
    seed: int = 0
    """Seeds model init, data order and the router (`growth.seed` seeds the growth's random maps and probe)."""

    def __post_init__(self) -> None:
        if self.small.moe is not None or self.large.moe is not None:
            raise ConfigError("RecipeConfig.small and .large must be dense models (moe: null); the MoE shape comes "
                              "from RecipeConfig.scale_out.moe")
        dense = {"train_small": self.small, "train_large": self.large}
        for stage in STAGE_FIELDS:  # every stage's TrainConfig, checked now (the data's vocabulary comes later)
            # the MoE stage is checked on large + scale_out.moe (the expert width the pipeline's moe_model sets
            # does not enter any TrainConfig check)
            model = dense.get(stage) or dataclasses.replace(self.large, moe=self.scale_out.moe)
            self.stage_config(stage, model, data_dir="")

    def stage_config(self, stage: str, model: ModelConfig, data_dir: str, *, init: str = "scratch",
                     init_from: str | None = None, data_start: int = 0, wandb_group: str | None = None
                     ) -> TrainConfig:
        """The TrainConfig of ``stage`` (train_small, train_large, train_moe): TrainConfig's defaults <-
        ``train`` <- the stage's overlay, with the fields the recipe sets (``SET_BY_RECIPE``, the W&B group)."""
        where = f"RecipeConfig.{STAGE_FIELDS[stage]}"
        for name, overlay in (("train", self.train), (STAGE_FIELDS[stage], getattr(self, STAGE_FIELDS[stage]))):
            if not isinstance(overlay, dict):
                raise ConfigError(f"RecipeConfig.{name}={overlay!r} must be a mapping of TrainConfig fields")
            taken = sorted(set(overlay) & set(SET_BY_RECIPE))
            if taken or "group" in (overlay.get("wandb") or {}):
                raise ConfigError(f"RecipeConfig.{name} sets {taken or ['wandb.group']}, which the recipe sets for "
                                  f"every stage (fields {list(SET_BY_RECIPE)} and wandb.group); remove it")
        data = merge_overlay(merge_overlay(to_dict(TrainConfig()), self.train), getattr(self, STAGE_FIELDS[stage]))
        data.update(model=to_dict(model), data_dir=data_dir, init=init, init_from=init_from, data_start=data_start,
                    seed=self.seed)
        data["wandb"] = {**data["wandb"], "group": wandb_group}
        try:
            return from_dict(TrainConfig, data, prefix=f"{STAGE_FIELDS[stage]}.")
        except ConfigError as e:
            raise ConfigError(f"{where} (TrainConfig's defaults <- RecipeConfig.train <- this overlay): {e}") from None


def tiny_recipe() -> RecipeConfig:
    """The quickstart: tiny (d64, 2 layers) -> tiny-large (d80, 4 layers) -> 32 fine-grained experts, top-4
    with Drop-Upcycling (the ``fine-grained-drop`` MoE preset: the Scale-Out study's best on these models), on
    the sample corpus, on CPU. Exact FPI growth so the Scale-Up transition shows function preservation; switch
    with ``--set growth.method=aki-pro``. AquilaMoE's exact 8x top-2 upcycling (the aquila3-efficientscale
    recipe's) instead: ``--set scale_out.moe=aquilamoe``."""
    return RecipeConfig(
        small=get_preset("tiny"),
        large=get_preset("tiny-large"),
        growth=GrowthConfig(method="fpi", depth_mode="identity", norm_mode="exact"),
        scale_out=ScaleOutConfig(moe=get_moe_preset("fine-grained-drop")),
        train={"global_batch_tokens": 16 * 128, "micro_batch_size": 16, "optimizer": {"lr": 2e-3},
               "schedule": {"warmup_steps": 10}, "eval_max_sequences": 64, "eval_tasks": "sample"},
        stage_small={"steps": 150, "optimizer": {"lr": 3e-3}},
        stage_large={"steps": 100},
        stage_moe={"steps": 100},
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
        scale_out=ScaleOutConfig(moe=get_moe_preset("aquilamoe"), mode="online"),
        train={"global_batch_tokens": small_batch, "micro_batch_size": 1, "checkpoint": {"every": 1000},
               "scaling": {"use_gpu": True, "zero_stage": 2, "max_failures": -1}, "eval_max_sequences": None},
        stage_small={"steps": round(3.6e12 / small_batch), "optimizer": {"lr": 1.2e-3},
                     "schedule": {"warmup_steps": 2000}, "scaling": {"num_workers": 64}},
        stage_large={"steps": round(1.2e12 / small_batch), "optimizer": {"lr": 4e-4},
                     "schedule": {"warmup_steps": 1000}, "scaling": {"num_workers": 128},
                     "activation_checkpointing": "selective"},
        stage_moe={"steps": round(545e9 / moe_batch), "global_batch_tokens": moe_batch, "optimizer": {"lr": 1.5e-4},
                   "schedule": {"warmup_steps": 500}, "checkpoint": {"every": 500},
                   "scaling": {"num_workers": 256, "expert_parallel": 8}, "activation_checkpointing": "full"},
    )


RECIPES: dict[str, Callable[[], RecipeConfig]] = {
    "tiny": tiny_recipe,
    "aquila3-efficientscale": aquila3_recipe,
}


def get_recipe(name: str) -> RecipeConfig:
    return from_registry(RECIPES, name, "recipe")


def build_recipe_config(preset: str = "tiny", overlay: dict[str, Any] | str | Path | None = None,
                        overrides: list[str] | None = None) -> RecipeConfig:
    """``resolve(RecipeConfig, ...)`` on a recipe preset: <- a YAML/JSON overlay <- ``a.b=value`` overrides
    (``--set stage_moe.steps=50``, ``--set large=demo-large``). Unknown fields and invalid values raise a
    ConfigError before any work."""
    return resolve(RecipeConfig, get_recipe(preset), overlay, overrides)

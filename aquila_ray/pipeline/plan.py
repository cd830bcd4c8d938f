"""The EfficientScale recipe's plan, before any work: the three model shapes, and per stage what it costs.

``plan_recipe`` validates the whole recipe (growth, every stage's TrainConfig and batch, the data it needs)
and prints what ``--dry-run`` shows; ``run_efficientscale`` calls it before the first stage.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from aquila_ray.config.base import to_dict
from aquila_ray.config.model import ModelConfig
from aquila_ray.config.recipe import STAGE_FIELDS, STAGE_NAMES, RecipeConfig
from aquila_ray.errors import ConfigError
from aquila_ray.growth import make_plan
from aquila_ray.plan import PlanAssumptions, cluster_fit, stage_plan
from aquila_ray.upcycle import UpcycleOptions, exactly_preserving, upcycled_config

SAMPLE_CORPUS_MAX_PARAMS = 1_000_000_000
"""A recipe whose dense models reach this size must name its data (the sample corpus is for toy models)."""


@dataclass(frozen=True)
class Models:
    """The three model shapes of a run, with the vocabulary of the data's tokenizer."""

    small: ModelConfig
    large: ModelConfig
    moe: ModelConfig


def resolve_models(cfg: RecipeConfig, vocab_size: int | None = None) -> Models:
    """small, large and the upcycled MoE config (``large`` + ``cfg.scale_out.moe``); ``vocab_size`` (the tokenizer's)
    replaces the presets' when given. Raises ConfigError when large cannot be grown from small."""
    def vocab(m: ModelConfig) -> ModelConfig:
        return m if vocab_size is None else dataclasses.replace(m, vocab_size=vocab_size, extra=dict(m.extra))

    small, large = vocab(cfg.small), vocab(cfg.large)
    make_plan(small, large, cfg.growth)  # validates the growth (shrinking, head_dim, KV groups, ...)
    return Models(small, large, moe_model(cfg, large))


def moe_model(cfg: RecipeConfig, dense: ModelConfig) -> ModelConfig:
    """The upcycled config of ``dense``: its shape with ``cfg.scale_out.moe`` (experts F / granularity wide)."""
    return upcycled_config(dense, cfg.scale_out.moe)


def plan_recipe(cfg: RecipeConfig, seq_len: int | None = None, vocab_size: int | None = None,
                cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per stage: parameters, active parameters, FLOPs per token, tokens (planned and steps x batch), memory
    per GPU under the stage's ZeRO stage, expert parallelism and activation checkpointing, host memory per
    node, checkpoint size and save time, wall-clock (under ``PlanAssumptions``); per transform: what it
    does; with ``cluster`` (a cluster.yaml dict) whether each stage fits it. Validates the whole recipe."""
    models = resolve_models(cfg, vocab_size)
    big = [m.describe() for m in (models.small, models.large) if m.num_params() >= SAMPLE_CORPUS_MAX_PARAMS]
    if cfg.data_dir is None and big:
        raise ConfigError(f"RecipeConfig.data_dir is not set, so this recipe would train {big[0]} on the bundled "
                          f"sample corpus (under a million tokens in 128-token sequences, for toy models): set "
                          f"data_dir to a prepared data set (python -m jobs.prepare_data) with --set data_dir=DIR")
    out: dict[str, Any] = {"stages": STAGE_NAMES,
                           "data": cfg.data_dir or "prepare_data on the bundled sample corpus -> DIR/data",
                           "assumptions": dataclasses.asdict(PlanAssumptions())}
    total = 0.0
    init = {"train_small": "scratch", "train_large": "checkpoint: scale_up",
            "train_moe": "upcycle (online)" if cfg.scale_out.mode == "online" else "checkpoint: scale_out"}
    for name, model in (("train_small", models.small), ("train_large", models.large), ("train_moe", models.moe)):
        tc = cfg.stage_config(name, model, cfg.data_dir or "")
        s = seq_len or model.max_seq_len
        try:
            tc.batch_sequences(s)
        except ConfigError as e:
            raise ConfigError(f"RecipeConfig.{STAGE_FIELDS[name]}: {e}") from None
        sc = tc.scaling
        p = stage_plan(model, float(tc.steps * tc.global_batch_tokens), sc.num_workers, sc.zero_stage,
                       sc.expert_parallel, tc.micro_batch_size, s, tc.activation_checkpointing)
        p.update(steps=tc.steps, lr=tc.optimizer.lr, global_batch_tokens=tc.global_batch_tokens,
                 max_failures=sc.max_failures, init=init[name])
        total += p["total_flops"]
        out[name] = p
    g = {k: _compact(v) for k, v in make_plan(models.small, models.large, cfg.growth).summary().items()}
    out["scale_up"] = {"runs_as": "Ray task", "method": cfg.growth.method, "plan": g}
    out["scale_out"] = {"runs_as": "Ray task (offline)" if cfg.scale_out.mode == "offline" else
                        "online, inside train_moe (each expert-parallel rank builds its experts)",
                        "moe": to_dict(models.moe.moe), "exactly_preserving_expected":
                        exactly_preserving(models.moe, UpcycleOptions(seed=cfg.seed))}
    last = cfg.stage_config("train_moe", models.moe, "")
    out["evaluate"] = {"checkpoints": list(STAGE_FIELDS),
                       "runs_as": "inside each stage's training workers, after its last step (and before its first "
                                  "update for the stages that start from a checkpoint)",
                       "validation_max_sequences": last.eval_max_sequences, "validation_tokens": last.eval_tokens,
                       "tasks": last.eval_tasks}
    out["total_training_flops"] = total
    if cluster is not None:
        out["cluster_fit"] = cluster_fit(cluster, {name: out[name] for name in STAGE_FIELDS})
    return out


def _compact(value: Any, limit: int = 160) -> Any:
    """A list of a growth plan as one line (the plan stays readable for 40-layer models)."""
    if not isinstance(value, list):
        return value
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[:limit] + f"... ({len(value)} entries)"




__all__ = ["Models", "SAMPLE_CORPUS_MAX_PARAMS", "moe_model", "plan_recipe", "resolve_models"]

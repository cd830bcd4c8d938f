"""EfficientScale end to end (AquilaMoE, arXiv 2408.06567): the recipe as one resumable stage graph.

    data -> train_small -> scale_up -> train_large -> scale_out -> train_moe -> evaluate   (+ report)

Each training stage is one Ray Train run (``aquila_ray.train.run_training``) named ``<run>.<stage>`` under
the storage path, so a stage interrupted halfway resumes from its own last registered checkpoint, and
evaluates itself in its workers (after its last step, and before its first update when it starts from a
checkpoint). The transforms between them (Scale-Up, offline Scale-Out) are Ray tasks that ask for the
memory they need (``aquila_ray.pipeline.tasks``). Every stage leaves ``DIR/stages/<name>/_DONE.json``; a rerun of the
same command skips finished stages (``aquila_ray.pipeline.stages``). The run report (``report.json``,
``loss_vs_flops.png``) is rebuilt from the stage outputs after every run.

Stage outputs are plain model checkpoints (``DIR/stages/<stage>/final`` for training stages,
``DIR/stages/<transform>/model`` for transforms): ``aquila_ray.load_model`` opens any of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ray

from aquila_ray.checkpoint import load_config
from aquila_ray.config.base import to_dict
from aquila_ray.config.recipe import STAGE_FIELDS, STAGE_NAMES, RecipeConfig
from aquila_ray.data.shards import read_manifest
from aquila_ray.errors import ConfigError
from aquila_ray.eval import tasks_location
from aquila_ray.pipeline.plan import Models, moe_model, plan_recipe, resolve_models
from aquila_ray.pipeline.report import write_report
from aquila_ray.pipeline.results import (
    DataResult,
    EvaluationResult,
    StageResult,
    TransitionResult,
    choice_from_rows,
    validation_from_rows,
)
from aquila_ray.pipeline.stages import Stage, run_stages
from aquila_ray.pipeline.tasks import run_scale_out, run_scale_up
from aquila_ray.pipeline.train_stage import train_stage
from aquila_ray.upcycle import UpcycleOptions
from aquila_ray.upcycle import method as upcycle_method
from data_pipeline.config import load_data_config
from data_pipeline.run import prepare_data

log = logging.getLogger("aquila_ray.pipeline")

def _val_loss(rows: list[dict[str, Any]]) -> float | None:
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return float(vals[-1]) if vals else None


class _Run:
    """What the stages share: the recipe, the output root, where Ray Train keeps runs, how tasks run."""

    def __init__(self, cfg: RecipeConfig, root: Path, storage_path: str, run_name: str, local_tasks: bool) -> None:
        self.cfg, self.root, self.storage, self.name, self.local = cfg, root, storage_path, run_name, local_tasks

    def models(self, outs: dict[str, Any]) -> Models:
        return resolve_models(self.cfg, read_manifest(outs["data"].data_dir).vocab_size)

    @staticmethod
    def before(stage: StageResult) -> dict[str, Any]:
        """A transition's starting point: the final validation of the stage whose checkpoint it transforms,
        measured by that stage's workers (the loss just after the transform is the next stage's
        ``validation_start``, measured by its workers before the first update)."""
        if stage.validation is None:
            raise ConfigError(f"{stage.checkpoint}: its stage measured no final validation (eval_every=-1?); a "
                              f"transition needs it")
        return {"loss_before": stage.validation.loss, "validation_before": stage.validation}

    # ------------------------------------------------------------------------------------------ stages
    def data(self, d: Path, outs: dict[str, Any]) -> DataResult:
        if self.cfg.data_dir:
            data_dir = str(Path(self.cfg.data_dir).resolve())
        else:
            config = load_data_config(None, self.cfg.data_overrides, None, str(self.root / "data"))
            data_dir = str(prepare_data(config))
        m = read_manifest(data_dir)
        return DataResult(data_dir=data_dir, seq_len=m.seq_len, vocab_size=m.vocab_size,
                          sequences={k: v.num_sequences for k, v in m.splits.items()})

    def train(self, name: str, d: Path, outs: dict[str, Any]) -> StageResult:
        # a stage trains the shape its init checkpoint holds (exact growth rescales rms_norm_eps, for one)
        if name == "train_small":
            model, init, init_from = self.models(outs).small, "scratch", None
        elif name == "train_large":
            init, init_from = "checkpoint", outs["scale_up"].checkpoint
            model = load_config(init_from)
        elif self.cfg.scale_out.mode == "online":
            init, init_from = "upcycle", outs["train_large"].checkpoint
            model = moe_model(self.cfg, load_config(init_from))
        else:
            init, init_from = "checkpoint", outs["scale_out"].checkpoint
            model = load_config(init_from)
        # the token stream continues where the previous stage stopped (no replay of what it has seen)
        prev = {"train_large": "train_small", "train_moe": "train_large"}.get(name)
        start = outs[prev].data_position if prev else 0
        tc = self.cfg.stage_config(name, model, outs["data"].data_dir, init=init, init_from=init_from,
                                   data_start=start, wandb_group=self.name)
        tasks = tasks_location(tc.eval_tasks)  # what the workers score ("sample" is resolved by them too)
        trained = train_stage(tc, self.storage, f"{self.name}.{name}", d / "final")
        rows = trained.rows
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        validation, start_validation = validation_from_rows(rows)
        return StageResult(checkpoint=trained.checkpoint, model=model.describe(), init=init, init_from=init_from,
                           data_start=start, data_position=trained.data_position, train_run=trained.run_dir,
                           steps=rows[-1]["step"] if rows else None, final_loss=rows[-1]["loss"] if rows else None,
                           validation_loss=_val_loss(rows), validation=validation, validation_start=start_validation,
                           multiple_choice=choice_from_rows(rows, tasks))

    def scale_up(self, d: Path, outs: dict[str, Any]) -> TransitionResult:
        src, dst = outs["train_small"].checkpoint, d / "model"
        report = run_scale_up(src, dst, self.cfg.growth, self.models(outs).large, local=self.local)
        return TransitionResult(checkpoint=str(dst), method=report["method"], depth_mode=report["depth_mode"],
                                norm_mode=report["norm_mode"], parameters=report["parameters"],
                                probe=report.get("probe"), **self.before(outs["train_small"]))

    def scale_out(self, d: Path, outs: dict[str, Any]) -> TransitionResult:
        src = outs["train_large"].checkpoint
        before = self.before(outs["train_large"])
        moe = moe_model(self.cfg, load_config(src))
        if self.cfg.scale_out.mode == "online":  # train_moe builds the experts from the dense checkpoint itself
            return TransitionResult(mode="online", dense_checkpoint=src, method=upcycle_method(moe), **before)
        dst = d / "model"
        report = run_scale_out(src, dst, moe, UpcycleOptions(seed=self.cfg.seed), local=self.local)
        return TransitionResult(mode="offline", checkpoint=str(dst), method=report["method"],
                                probe=report.get("probe"), parameters=report["parameters"], **before)

    def final_eval(self, d: Path, outs: dict[str, Any]) -> EvaluationResult:
        """The three finals' evaluations, as each stage's workers measured them after its last step (sharded,
        in the stage's parallel layout, within the token budget): nothing is loaded again here."""
        results = {}
        for name in STAGE_FIELDS:
            stage: StageResult = outs[name]
            results[name] = {"checkpoint": stage.checkpoint, **{k: to_dict(v) for k, v in (
                ("validation", stage.validation), ("multiple_choice", stage.multiple_choice)) if v is not None}}
        (d / "evaluation.json").write_text(json.dumps(results, indent=2))
        return EvaluationResult(results=results)

    def stages(self) -> list[Stage]:
        def train(name: str) -> Stage:
            return Stage(name, "train", lambda d, o: self.train(name, d, o), StageResult)

        return [Stage("data", "prepare_data", self.data, DataResult), train("train_small"),
                Stage("scale_up", "scale_up", self.scale_up, TransitionResult), train("train_large"),
                Stage("scale_out", "scale_out", self.scale_out, TransitionResult), train("train_moe"),
                Stage("evaluate", "evaluate", self.final_eval, EvaluationResult)]


def run_efficientscale(cfg: RecipeConfig, output: str | Path, *, storage_path: str | None = None,
                       run_name: str | None = None, until: str | None = None, ray_address: str | None = None,
                       local_tasks: bool = False) -> dict[str, Any]:
    """Run (or resume) the recipe into ``output``; returns the run report.

    ``storage_path`` is where Ray Train keeps the stage runs (default ``output/runs``; a URI such as
    ``s3://bucket/runs`` works too); ``run_name`` names them and the W&B group (default: ``output``'s name);
    ``until`` stops after that stage; ``local_tasks`` runs the transforms in this process instead of as
    Ray tasks.
    """
    if until is not None and until not in STAGE_NAMES:
        raise ConfigError(f"until={until!r} is not a stage; valid: {list(STAGE_NAMES)}")
    root = Path(output).resolve()
    name = run_name or root.name
    if not name or "/" in name:
        raise ConfigError(f"run_name={name!r} must be a non-empty name without '/'")
    plan_recipe(cfg)  # every recipe error before any work (the data's vocabulary replaces the presets' later)
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if not ray.is_initialized():
        ray.init(address=ray_address)
    run = _Run(cfg, root, storage_path or str(root / "runs"), name, local_tasks)
    stages = run.stages()
    if until is not None:
        stages = stages[: STAGE_NAMES.index(until) + 1]
    outs = run_stages(root, stages)
    return write_report(root, outs)


__all__ = ["run_efficientscale"]

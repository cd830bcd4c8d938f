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

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aquila_ray.config.base import to_dict
from aquila_ray.config.model import ModelConfig
from aquila_ray.config.recipe import RecipeConfig, StageConfig
from aquila_ray.config.train import TrainConfig, stage_train_config
from aquila_ray.errors import ConfigError
from aquila_ray.eval import tasks_location
from aquila_ray.pipeline.report import build_report, plot_loss_vs_flops
from aquila_ray.pipeline.results import (
    DataResult,
    EvaluationResult,
    StageResult,
    TransitionResult,
    choice_from_rows,
    validation_from_rows,
)
from aquila_ray.pipeline.stages import Stage, completed, run_stages, stage_dir
from aquila_ray.plan import PlanAssumptions, cluster_fit, stage_plan
from aquila_ray.train.metrics import read_metrics, read_run_metrics
from aquila_ray.upcycle import UpcycleOptions

log = logging.getLogger("aquila_ray.pipeline")

STAGE_NAMES = ("data", "train_small", "scale_up", "train_large", "scale_out", "train_moe", "evaluate")
TRAIN_STAGES = {"train_small": "stage_small", "train_large": "stage_large", "train_moe": "stage_moe"}
SAMPLE_CORPUS_MAX_PARAMS = 1_000_000_000
"""A recipe whose dense models reach this size must name its data (the sample corpus is for toy models)."""
REPORT_NAME = "report.json"
PLOT_NAME = "loss_vs_flops.png"
# what a stage's exported model keeps of Ray Train's checkpoint (no optimizer state: the next stage starts fresh)
_KEEP = ("config.json", "model.safetensors.index.json", "trainer_state.json")
_KEEP_IF_PRESENT = ("tokenizer.json", "tokenizer_config.json")  # the data's tokenizer (real data sets have one)


@dataclass(frozen=True)
class Models:
    """The three model shapes of a run, with the vocabulary of the data's tokenizer."""

    small: ModelConfig
    large: ModelConfig
    moe: ModelConfig


def resolve_models(cfg: RecipeConfig, vocab_size: int | None = None) -> Models:
    """small, large and the upcycled MoE config (``large`` + ``cfg.moe``); ``vocab_size`` (the tokenizer's)
    replaces the presets' when given. Raises ConfigError when large cannot be grown from small."""
    from aquila_ray.growth import make_plan

    def vocab(m: ModelConfig) -> ModelConfig:
        return m if vocab_size is None else dataclasses.replace(m, vocab_size=vocab_size, extra=dict(m.extra))

    small, large = vocab(cfg.small), vocab(cfg.large)
    make_plan(small, large, cfg.growth)  # validates the growth (shrinking, head_dim, KV groups, ...)
    return Models(small, large, moe_model(cfg, large))


def moe_model(cfg: RecipeConfig, dense: ModelConfig) -> ModelConfig:
    """The upcycled config of ``dense``: its shape with ``cfg.moe`` (experts F / granularity wide)."""
    from aquila_ray.upcycle import moe_config

    m = to_dict(cfg.moe)
    fields = {k: v for k, v in m.items() if k not in ("num_experts", "top_k", "granularity",
                                                      "expert_intermediate_size")}
    return moe_config(dense, m["num_experts"], m["top_k"], m["granularity"], **fields)


def plan_recipe(cfg: RecipeConfig, seq_len: int | None = None, vocab_size: int | None = None,
                cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per stage: parameters, active parameters, FLOPs per token, tokens (planned and steps x batch), memory
    per GPU under the stage's ZeRO stage, expert parallelism and activation checkpointing, host memory per
    node, checkpoint size and save time, wall-clock (under ``PlanAssumptions``); per transform: what it
    does; with ``cluster`` (a cluster.yaml dict) whether each stage fits it. Validates the whole recipe."""
    from aquila_ray.growth import make_plan
    from aquila_ray.upcycle import exactly_preserving

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
    for name, model in (("train_small", models.small), ("train_large", models.large), ("train_moe", models.moe)):
        st: StageConfig = getattr(cfg, TRAIN_STAGES[name])
        s = seq_len or model.max_seq_len
        if st.global_batch_tokens % s:
            raise ConfigError(f"RecipeConfig.{TRAIN_STAGES[name]}.global_batch_tokens={st.global_batch_tokens} is "
                              f"not a multiple of seq_len={s}")
        p = stage_plan(model, st.tokens(), st.num_workers, st.zero_stage,
                       st.expert_parallel if model.moe is not None else 1, st.micro_batch_size, s,
                       st.activation_checkpointing)
        p.update(steps=st.steps, lr=st.lr, global_batch_tokens=st.global_batch_tokens,
                 tokens_from_steps=st.steps * st.global_batch_tokens, max_failures=st.max_failures,
                 tokens_deviation=round(st.steps * st.global_batch_tokens / st.tokens() - 1, 6),
                 init={"train_small": "scratch", "train_large": "checkpoint: scale_up",
                       "train_moe": "upcycle (online)" if cfg.upcycle == "online" else "checkpoint: scale_out"}[name])
        total += p["total_flops"]
        out[name] = p
    g = {k: _compact(v) for k, v in make_plan(models.small, models.large, cfg.growth).summary().items()}
    out["scale_up"] = {"runs_as": "Ray task", "method": cfg.growth.method, "plan": g}
    out["scale_out"] = {"runs_as": "Ray task (offline)" if cfg.upcycle == "offline" else
                        "online, inside train_moe (each expert-parallel rank builds its experts)",
                        "moe": to_dict(models.moe.moe), "exactly_preserving_expected":
                        exactly_preserving(models.moe, UpcycleOptions(seed=cfg.seed))}
    out["evaluate"] = {"checkpoints": ["train_small", "train_large", "train_moe"],
                       "runs_as": "inside each stage's training workers, after its last step (and before its first "
                                  "update for the stages that start from a checkpoint)",
                       "validation_max_sequences": cfg.eval_max_sequences, "validation_tokens": cfg.eval_tokens,
                       "tasks": cfg.eval_tasks}
    out["total_training_flops"] = total
    if cluster is not None:
        out["cluster_fit"] = cluster_fit(cluster, {name: out[name] for name in TRAIN_STAGES})
    return out


# ------------------------------------------------------------------------------------------------ helpers
def _compact(value: Any, limit: int = 160) -> Any:
    """A list of a growth plan as one line (the plan stays readable for 40-layer models)."""
    if not isinstance(value, list):
        return value
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[:limit] + f"... ({len(value)} entries)"


def export_model(checkpoint: Any, dst: Path) -> Path:
    """Copy the model part of a Ray Train checkpoint (local or on object storage) into ``dst``, atomically."""
    import pyarrow.fs as pafs

    from aquila_ray.checkpoint import atomic_directory, load_config

    fs, root = checkpoint.filesystem, checkpoint.path
    index = json.loads(fs.open_input_file(f"{root}/model.safetensors.index.json").read())
    names = sorted(set(index["weight_map"].values())) + [n for n in _KEEP]
    names += [n for n in _KEEP_IF_PRESENT if fs.get_file_info(f"{root}/{n}").type == pafs.FileType.File]
    with atomic_directory(dst) as tmp:
        for name in names:
            pafs.copy_files(f"{root}/{name}", str(tmp / name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    load_config(dst)  # the exported directory is a loadable checkpoint
    return dst


def data_position(checkpoint: str | Path) -> int:
    """Where in the sample stream the run that wrote ``checkpoint`` stopped (its trainer_state.json)."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["data_position"])


@dataclass(frozen=True)
class TrainedStage:
    """One training stage's outcome: its exported model checkpoint, its Ray Train run, its metric rows and
    where in the sample stream it stopped."""

    checkpoint: str
    run_dir: str
    rows: list[dict[str, Any]]
    data_position: int


def train_stage(cfg: TrainConfig, storage_path: str, run_name: str, final: Path) -> TrainedStage:
    """Run (or resume: same ``run_name``) one stage as a Ray Train run, copy its final model into ``final`` and
    read its metric rows (local or remote storage). The pipeline's training stages and the benchmarks that
    train stage by stage (bench/efficientscale.py, bench/scale_out.py) all go through here."""
    from aquila_ray.train import run_training  # deferred: Ray Train and DeepSpeed, not needed by --dry-run

    result = run_training(cfg, storage_path, run_name)
    if result.checkpoint is None:
        raise ConfigError(f"run {run_name}: Ray Train registered no checkpoint (run {result.run_dir})")
    path = export_model(result.checkpoint, final)
    return TrainedStage(str(path), result.run_dir, read_run_metrics(result.run_dir), data_position(path))


def _val_loss(rows: list[dict[str, Any]]) -> float | None:
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return float(vals[-1]) if vals else None


class _Run:
    """What the stages share: the recipe, the output root, where Ray Train keeps runs, how tasks run."""

    def __init__(self, cfg: RecipeConfig, root: Path, storage_path: str, run_name: str, local_tasks: bool) -> None:
        self.cfg, self.root, self.storage, self.name, self.local = cfg, root, storage_path, run_name, local_tasks

    def models(self, outs: dict[str, Any]) -> Models:
        from aquila_ray.data.shards import read_manifest

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
        from aquila_ray.data.shards import read_manifest

        if self.cfg.data_dir:
            data_dir = str(Path(self.cfg.data_dir).resolve())
        else:
            from data_pipeline.config import load_data_config
            from data_pipeline.run import prepare_data

            config = load_data_config(None, self.cfg.data_overrides, None, str(self.root / "data"))
            data_dir = str(prepare_data(config))
        m = read_manifest(data_dir)
        return DataResult(data_dir=data_dir, seq_len=m.seq_len, vocab_size=m.vocab_size,
                          sequences={k: v.num_sequences for k, v in m.splits.items()})

    def train(self, name: str, d: Path, outs: dict[str, Any]) -> StageResult:
        from aquila_ray.checkpoint import load_config

        # a stage trains the shape its init checkpoint holds (exact growth rescales rms_norm_eps, for one)
        if name == "train_small":
            model, init, init_from = self.models(outs).small, "scratch", None
        elif name == "train_large":
            init, init_from = "checkpoint", outs["scale_up"].checkpoint
            model = load_config(init_from)
        elif self.cfg.upcycle == "online":
            init, init_from = "upcycle", outs["train_large"].checkpoint
            model = moe_model(self.cfg, load_config(init_from))
        else:
            init, init_from = "checkpoint", outs["scale_out"].checkpoint
            model = load_config(init_from)
        stage: StageConfig = getattr(self.cfg, TRAIN_STAGES[name])
        # the token stream continues where the previous stage stopped (no replay of what it has seen)
        prev = {"train_large": "train_small", "train_moe": "train_large"}.get(name)
        start = outs[prev].data_position if prev else 0
        tc = stage_train_config(stage, model, outs["data"].data_dir, init=init, init_from=init_from,
                                seed=self.cfg.seed, data_start=start, wandb_project=self.cfg.wandb_project,
                                wandb_group=self.name)
        tasks = tasks_location(self.cfg.eval_tasks)
        tc = dataclasses.replace(tc, eval_max_sequences=self.cfg.eval_max_sequences, eval_tokens=self.cfg.eval_tokens,
                                 eval_tasks=tasks)
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
        from aquila_ray.pipeline.tasks import run_scale_up

        src, dst = outs["train_small"].checkpoint, d / "model"
        report = run_scale_up(src, dst, self.cfg.growth, self.models(outs).large, local=self.local)
        return TransitionResult(checkpoint=str(dst), method=report["method"], depth_mode=report["depth_mode"],
                                norm_mode=report["norm_mode"], parameters=report["parameters"],
                                probe=report.get("probe"), **self.before(outs["train_small"]))

    def scale_out(self, d: Path, outs: dict[str, Any]) -> TransitionResult:
        src = outs["train_large"].checkpoint
        before = self.before(outs["train_large"])
        if self.cfg.upcycle == "online":  # train_moe builds the experts from the dense checkpoint itself
            return TransitionResult(mode="online", dense_checkpoint=src, **before)
        from aquila_ray.pipeline.tasks import run_scale_out

        dst = d / "model"
        from aquila_ray.checkpoint import load_config

        moe = moe_model(self.cfg, load_config(src))
        report = run_scale_out(src, dst, moe, UpcycleOptions(seed=self.cfg.seed), local=self.local)
        return TransitionResult(mode="offline", checkpoint=str(dst), method=report["method"],
                                probe=report.get("probe"), parameters=report["parameters"], **before)

    def final_eval(self, d: Path, outs: dict[str, Any]) -> EvaluationResult:
        """The three finals' evaluations, as each stage's workers measured them after its last step (sharded,
        in the stage's parallel layout, within the token budget): nothing is loaded again here."""
        results = {}
        for name in TRAIN_STAGES:
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


def write_report(root: Path, outs: dict[str, Any]) -> dict[str, Any]:
    """report.json and loss_vs_flops.png from the stages done so far (their typed results, by name)."""
    train_stages = []
    for name in TRAIN_STAGES:
        if name not in outs:
            continue
        stage: StageResult = outs[name]
        train_stages.append({"name": name, "model": stage.model,
                             "metrics": read_metrics(stage_dir(root, name) / "metrics.jsonl"),
                             "validation_loss": stage.validation.loss if stage.validation else stage.validation_loss})
    transitions = []
    for t, a, b in (("scale_up", "train_small", "train_large"), ("scale_out", "train_large", "train_moe")):
        if t in outs:
            after = outs[b].validation_start if b in outs else None
            transitions.append({"name": t, "from_stage": a, "to_stage": b, "loss_before": outs[t].loss_before,
                                "loss_after": after.loss if after is not None else None})
    report = build_report(train_stages, transitions)
    report["stage_seconds"] = {k: (completed(root, k) or {}).get("seconds") for k in outs}
    if "evaluate" in outs:
        report["evaluation"] = outs["evaluate"].results
    (root / REPORT_NAME).write_text(json.dumps(report, indent=2))
    if any(s["metrics"] for s in train_stages):
        plot_loss_vs_flops(train_stages, root / PLOT_NAME)
    return report


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
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address)
    run = _Run(cfg, root, storage_path or str(root / "runs"), name, local_tasks)
    stages = run.stages()
    if until is not None:
        stages = stages[: STAGE_NAMES.index(until) + 1]
    outs = run_stages(root, stages)
    return write_report(root, outs)


__all__ = ["STAGE_NAMES", "Models", "export_model", "plan_recipe", "resolve_models", "run_efficientscale",
           "write_report"]

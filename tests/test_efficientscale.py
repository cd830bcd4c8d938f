"""EfficientScale end to end: recipe config, the --dry-run plan, and the tiny pipeline on a local Ray cluster.

The pipeline test runs the ``tiny`` recipe with fewer steps (on the bundled sample corpus) in two goes:
first ``until="scale_up"``, then the rest; a third run after deleting the last stages' markers must not
redo any training step. It checks the recipe's claims on the run report: exact FPI growth keeps the
validation loss within 1%, Drop-Upcycling moves it as its report says, and the MoE stage ends below the
dense stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from aquila_ray.config.recipe import STAGE_NAMES, build_recipe_config
from aquila_ray.errors import ConfigError
from aquila_ray.pipeline.efficientscale import run_efficientscale
from aquila_ray.pipeline.plan import plan_recipe
from aquila_ray.pipeline.stages import MARKER

RAY_CPUS = 3
RAY_ENV = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}

# ---------------------------------------------------------------------------------------------- config, plan


def test_recipe_overrides_and_model_presets() -> None:
    cfg = build_recipe_config("tiny", {"large": {"preset": "demo-large", "num_layers": 6}, "stage_moe": {"steps": 7}},
                              ["small=demo-small", "small.num_layers=3", "growth.method=aki-pro",
                               "stage_small.optimizer.lr=1e-3", "train.scaling.num_workers=2"])
    assert (cfg.small.hidden_size, cfg.small.num_layers) == (256, 3)
    assert (cfg.large.hidden_size, cfg.large.num_layers) == (320, 6)
    assert cfg.growth.method == "aki-pro"
    small, large, moe = (cfg.stage_config(s, m, "/d") for s, m in (
        ("train_small", cfg.small), ("train_large", cfg.large),
        ("train_moe", dataclasses.replace(cfg.large, moe=cfg.scale_out.moe))))
    assert (moe.steps, small.optimizer.lr, small.steps) == (7, 1e-3, 150)
    # untouched fields keep the preset's value: its shared `train` overlay, then TrainConfig's defaults
    assert (large.steps, large.optimizer.lr, large.schedule.warmup_steps, large.micro_batch_size) == (100, 2e-3, 10, 16)
    assert [c.scaling.num_workers for c in (small, large, moe)] == [2, 2, 2]
    assert (large.optimizer.weight_decay, large.data_dir, large.seed) == (0.1, "/d", cfg.seed)


def test_recipe_stage_overlays_are_checked_as_train_configs() -> None:
    """A stage's overlay is a TrainConfig overlay: its errors name the stage and the field; the fields the
    recipe sets for every stage cannot be set in it."""
    with pytest.raises(ConfigError, match=r"RecipeConfig.stage_moe .*TrainConfig.steps=0 must be a positive integer"):
        build_recipe_config("tiny", None, ["stage_moe.steps=0"])
    with pytest.raises(ConfigError, match=r"RecipeConfig.stage_small .*unknown field\(s\) "
                                          r"\['stage_small.optimizer.lrr'\] for OptimizerConfig"):
        build_recipe_config("tiny", None, ["stage_small.optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"RecipeConfig.stage_large sets \['model'\], which the recipe sets"):
        build_recipe_config("tiny", {"stage_large": {"model": "tiny"}})
    with pytest.raises(ConfigError, match=r"RecipeConfig.train sets \['wandb.group'\]"):
        build_recipe_config("tiny", None, ["train.wandb.group=x"])
    # expert parallelism is checked against each stage's model: the dense stages have no experts
    with pytest.raises(ConfigError, match=r"RecipeConfig.stage_small .*expert_parallel=2 needs an MoE model"):
        build_recipe_config("tiny", None, ["stage_small.scaling.expert_parallel=2"])
    cfg = build_recipe_config("tiny", None, ["stage_moe.scaling.expert_parallel=2", "stage_moe.scaling.num_workers=2"])
    assert cfg.stage_moe["scaling"] == {"expert_parallel": 2, "num_workers": 2}


def test_recipe_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['stage_small.stepz'\]"):
        build_recipe_config("tiny", {"stage_small": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"growth.method='net2net' is not valid; choose one of \['fpi', 'aki', "):
        build_recipe_config("tiny", None, ["growth.method=net2net"])
    with pytest.raises(ConfigError, match=r"unknown recipe preset 'huge'; valid presets: \['aquila3-efficientscale'"):
        build_recipe_config("huge")


def test_scale_out_presets() -> None:
    """The tiny recipe's Scale-Out is the study's best setting (not function preserving); ``aquilamoe`` (the
    aquila3 recipe's) is exact 8x top-2; a preset name takes field overrides on top; a bad name lists the valid
    ones."""
    tiny = build_recipe_config("tiny")
    m = tiny.scale_out.moe
    assert (m.num_experts, m.top_k, m.granularity, m.drop_upcycling_ratio, m.z_loss_coeff) == (32, 4, 4, 0.5, 1e-3)
    assert not plan_recipe(tiny)["scale_out"]["exactly_preserving_expected"]
    exact = build_recipe_config("tiny", None, ["scale_out.moe=aquilamoe"])
    m = exact.scale_out.moe
    assert (m.num_experts, m.top_k, m.granularity, m.drop_upcycling_ratio, m.z_loss_coeff) == (8, 2, 1, 0.0, 0.01)
    assert plan_recipe(exact)["scale_out"]["exactly_preserving_expected"]
    assert build_recipe_config("aquila3-efficientscale").scale_out.moe == m
    m = build_recipe_config("tiny", {"scale_out": {"moe": {"preset": "aquilamoe", "top_k": 1}}}).scale_out.moe
    assert (m.num_experts, m.top_k) == (8, 1)
    with pytest.raises(ConfigError, match=r"unknown MoE preset 'mixtral'; valid presets: \['aquilamoe', "
                                          r"'fine-grained-drop'\]"):
        build_recipe_config("tiny", None, ["scale_out.moe=mixtral"])


def test_online_scale_out_transition_names_its_method(tmp_path: Path) -> None:
    """Online upcycling writes no checkpoint, but its transition still says what the MoE stage will build (the
    report and the job's summary print it)."""
    from aquila_ray.checkpoint import save_model
    from aquila_ray.config import get_preset
    from aquila_ray.model import build_model
    from aquila_ray.pipeline.efficientscale import _Run
    from aquila_ray.pipeline.results import StageResult, Validation

    dense = save_model(build_model(get_preset("tiny-large"), seed=0), tmp_path / "dense")
    large = StageResult(checkpoint=str(dense), model="tiny-large", init="checkpoint", init_from=None, data_start=0,
                        data_position=0, train_run="", steps=1, final_loss=5.0, validation_loss=5.0,
                        validation=Validation(loss=5.0))
    for moe, words in (("fine-grained-drop", ("granular", "Drop-Upcycling")), ("aquilamoe", ("copies",))):
        cfg = build_recipe_config("tiny", None, ["scale_out.mode=online", f"scale_out.moe={moe}"])
        t = _Run(cfg, tmp_path, "", "x", True).scale_out(tmp_path / moe, {"train_large": large})
        assert (t.mode, t.checkpoint, t.dense_checkpoint, t.loss_before) == ("online", None, str(dense), 5.0)
        assert t.method is not None and all(w in t.method for w in words), t.method


def test_plan_rejects_a_large_model_smaller_than_small() -> None:
    cfg = build_recipe_config("tiny", None, ["large=tiny", "small=tiny-large"])
    with pytest.raises(ConfigError, match="hidden_size"):
        plan_recipe(cfg)


def test_aquila3_recipe_plan() -> None:
    """The seed's recipe: 7B -> 16B (AKI-Pro) -> 8x16B top-2, LR 1.2e-3 / 4e-4 / 1.5e-4, 12M / 12M / 24M tokens."""
    with pytest.raises(ConfigError, match=r"RecipeConfig.data_dir is not set, so this recipe would train dense: "
                                          r"L=32 D=4096 .* on the bundled sample corpus"):
        plan_recipe(build_recipe_config("aquila3-efficientscale"))
    plan = plan_recipe(build_recipe_config("aquila3-efficientscale", None, ["data_dir=/data"]))
    small, large, moe = plan["train_small"], plan["train_large"], plan["train_moe"]
    assert 7.0e9 < small["parameters"] < 8.5e9
    assert 15e9 < large["parameters"] < 17e9
    assert 95e9 < moe["parameters"] < 110e9 and 25e9 < moe["active_parameters"] < 32e9
    assert [small["lr"], large["lr"], moe["lr"]] == [1.2e-3, 4e-4, 1.5e-4]
    assert [p["global_batch_tokens"] // 2**20 for p in (small, large, moe)] == [12, 12, 24]
    for p in (small, large, moe):  # the steps the trainer runs are the seed's token budgets
        assert p["tokens"] == p["steps"] * p["global_batch_tokens"]
    assert [p["tokens"] for p in (small, large, moe)] == pytest.approx([3.6e12, 1.2e12, 545e9], rel=2e-5)
    assert plan["scale_up"]["method"] == "aki-pro" and moe["expert_parallel"] == 8
    assert plan["scale_out"]["moe"]["num_experts"] == 8 and plan["scale_out"]["moe"]["top_k"] == 2
    for p in (small, large, moe):  # memory per GPU under ZeRO-1 (+ EP for the MoE) is reported and plausible
        assert 1 < p["memory_per_gpu_gib"]["total"] < 141
        assert p["flops_per_token"] == pytest.approx(6 * p["active_parameters"], rel=0.25)
    # the layer map of AKI-Pro's depth interpolation (32 -> 40 duplicates layers 0, 4, ..., 28)
    assert plan["scale_up"]["plan"]["layer_map"].startswith("[0,0,1,2,3,4,4,")


def test_dry_run_job_prints_the_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from jobs.efficientscale import main

    main(["--preset", "aquila3-efficientscale", "--output", str(tmp_path / "x"), "--dry-run", "--set",
          "data_dir=/data", "--cluster", str(Path(__file__).resolve().parents[1] / "cluster.yaml")])
    out = capsys.readouterr().out
    assert "== plan ==" in out and '"total_training_flops"' in out and "MoE 8x top-2" in out
    assert '"cluster_fit"' in out and '"wall_clock_days"' in out
    with pytest.raises(ConfigError, match=r"--cluster '.*nope.yaml' is not a Ray cluster launcher file"):
        main(["--preset", "aquila3-efficientscale", "--output", str(tmp_path / "x"), "--dry-run", "--set",
              "data_dir=/data", "--cluster", str(tmp_path / "nope.yaml")])
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


def test_until_must_name_a_stage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"until='train' is not a stage; valid: \['data', 'train_small'"):
        run_efficientscale(build_recipe_config("tiny"), tmp_path, until="train")


def test_stage_results_are_typed_and_read_back_from_their_markers(tmp_path: Path) -> None:
    """run_stages hands each stage the typed results of the ones before; a rerun rebuilds them from the
    markers (same dataclasses, nested ones too) without running the stage again; a damaged marker is an
    error naming the stage and the field."""
    from aquila_ray.pipeline.results import DataResult, TransitionResult, Validation
    from aquila_ray.pipeline.stages import Stage, run_stages

    calls: list[str] = []

    def data(d: Path, outs: dict[str, Any]) -> DataResult:
        calls.append("data")
        return DataResult(data_dir=str(d), seq_len=128, vocab_size=512, sequences={"train": 10, "validation": 2})

    def grow(d: Path, outs: dict[str, Any]) -> TransitionResult:
        calls.append("grow")
        assert isinstance(outs["data"], DataResult) and outs["data"].seq_len == 128
        return TransitionResult(loss_before=4.5, validation_before=Validation(loss=4.5, tokens=256), method="fpi")

    stages = [Stage("data", "prepare_data", data, DataResult), Stage("grow", "scale_up", grow, TransitionResult)]
    first = run_stages(tmp_path, stages)
    again = run_stages(tmp_path, stages)
    assert calls == ["data", "grow"] and again == first
    assert isinstance(again["grow"].validation_before, Validation) and again["grow"].validation_before.tokens == 256
    marker = tmp_path / "stages" / "grow" / MARKER
    marker.write_text(marker.read_text().replace('"method"', '"methd"'))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['grow/_DONE.json: methd'\] for TransitionResult"):
        run_stages(tmp_path, stages)


# ---------------------------------------------------------------------------------------------- the pipeline
STEPS = ["stage_small.steps=60", "stage_large.steps=30", "stage_moe.steps=40", "stage_small.checkpoint.every=30",
         "stage_large.checkpoint.every=30", "stage_moe.checkpoint.every=20", "train.eval_max_sequences=32",
         # near dedup off and 2 shuffle partitions: its shuffles cost a minute here and the data job's own
         # tests cover them (tests/test_data_pipeline.py)
         "data_overrides=[dedup.fuzzy=false, shuffle_partitions=2]"]


def markers(root: Path) -> dict[str, str]:
    return {n: (root / "stages" / n / MARKER).read_text() for n in STAGE_NAMES
            if (root / "stages" / n / MARKER).is_file()}


@pytest.fixture(scope="module")
def run(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("es") / "tinyrun"
    cfg = build_recipe_config("tiny", None, STEPS)
    first = run_efficientscale(cfg, root, until="scale_up")
    after_first = markers(root)
    report = run_efficientscale(cfg, root)
    return {"root": root, "first": first, "after_first": after_first, "report": report, "cfg": cfg}


@pytest.mark.ray
def test_until_stops_and_rerun_resumes_at_the_next_stage(run: dict[str, Any]) -> None:
    assert sorted(run["after_first"]) == ["data", "scale_up", "train_small"]
    assert [s["name"] for s in run["first"]["stages"]] == ["train_small"]
    after = markers(run["root"])
    assert sorted(after) == sorted(STAGE_NAMES)
    for name, text in run["after_first"].items():  # finished stages were not redone
        assert after[name] == text
    # each stage continues the sample stream where the previous one stopped (16 sequences a step)
    m = {n: json.loads(t) for n, t in after.items()}
    assert m["train_large"]["data_start"] == m["train_small"]["data_position"] == 60 * 16
    assert m["train_moe"]["data_start"] == m["train_large"]["data_position"] == (60 + 30) * 16


@pytest.mark.ray
def test_transitions_preserve_the_loss(run: dict[str, Any]) -> None:
    """Exact FPI (identity depth, exact norms): the validation loss just after growth is within 1% of the
    loss just before (in fact ~1e-7). The tiny recipe's Scale-Out (``fine-grained-drop``) re-draws half of
    every expert, so the MoE starts above the dense loss, as its upcycling report says it will (exact
    upcycling through the same task: tests/test_upcycle.py)."""
    trans = {t["name"]: t for t in run["report"]["transitions"]}
    assert set(trans) == {"scale_up", "scale_out"}
    up, out = trans["scale_up"], trans["scale_out"]
    assert abs(up["relative_change"]) < 0.01 and abs(up["loss_after"] - up["loss_before"]) < 1e-4, up
    assert "granular" in out["method"] and "Drop-Upcycling" in out["method"], out
    assert out["loss_after"] - out["loss_before"] > 1e-3 and out["probe"]["max_abs_logit_diff"] > 1e-3, out
    stages = {s["name"]: s for s in run["report"]["stages"]}
    # the loss before each transform is the previous stage's final checkpoint's validation loss
    assert trans["scale_up"]["loss_before"] == pytest.approx(stages["train_small"]["validation_loss"], rel=1e-6)
    assert trans["scale_out"]["loss_before"] == pytest.approx(stages["train_large"]["validation_loss"], rel=1e-6)


@pytest.mark.ray
def test_moe_stage_ends_below_the_dense_stages(run: dict[str, Any]) -> None:
    stages = {s["name"]: s for s in run["report"]["stages"]}
    assert [stages[n]["steps"] for n in ("train_small", "train_large", "train_moe")] == [60, 30, 40]
    moe, large, small = (stages[n]["validation_loss"] for n in ("train_moe", "train_large", "train_small"))
    assert moe < large < small
    assert stages["train_moe"]["end_loss_smoothed"] < stages["train_large"]["end_loss_smoothed"]
    # FLOPs per stage: the MoE's active parameters per token > the large dense model's (k experts of F/k: the
    # dense MLP's, plus the router)
    assert stages["train_moe"]["flops"] > stages["train_large"]["flops"] * 40 / 30


@pytest.mark.ray
def test_report_files_and_stage_outputs(run: dict[str, Any]) -> None:
    import torch

    import aquila_ray

    root: Path = run["root"]
    report = json.loads((root / "report.json").read_text())
    assert report == json.loads(json.dumps(run["report"]))
    assert (root / "loss_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = report["evaluation"]
    assert sorted(ev) == ["train_large", "train_moe", "train_small"]
    for r in ev.values():
        assert r["validation"]["sequences"] == 32 and r["validation"]["tokens"] == 32 * 128
        assert 0 <= r["multiple_choice"]["accuracy"] <= 1 and r["multiple_choice"]["items"] == 100
    # the evaluation is what each stage's workers measured after its last step; the transitions start from
    # the same measurement (no second pass), and it equals a single-process evaluation of the exported final
    from aquila_ray.eval import evaluate_checkpoint
    from aquila_ray.pipeline.stages import completed

    assert ev["train_small"]["validation"] == completed(root, "scale_up")["validation_before"]
    assert ev["train_large"]["validation"] == completed(root, "scale_out")["validation_before"]
    assert ev["train_small"]["checkpoint"] == completed(root, "train_small")["checkpoint"]
    for name in ("train_small", "train_moe"):
        alone = evaluate_checkpoint(ev[name]["checkpoint"], root / "data", tasks=ev[name]["multiple_choice"]["tasks"],
                                    max_sequences=32)
        assert ev[name]["validation"]["loss"] == pytest.approx(alone["validation"]["loss"], rel=1e-6)
        assert ev[name]["validation"]["tokens"] == alone["validation"]["tokens"]
        assert ev[name]["multiple_choice"]["correct"] == alone["multiple_choice"]["correct"]
    moe = aquila_ray.load_model(root / "stages" / "train_moe" / "final")
    assert moe.config.moe is not None and (moe.config.moe.num_experts, moe.config.moe.top_k) == (32, 4)
    assert moe(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, moe.config.vocab_size)
    # a stage's exported model holds no optimizer state, and carries the data's tokenizer: exported to
    # Hugging Face (Qwen2-MoE) it opens with AutoTokenizer as is
    assert not list((root / "stages" / "train_small" / "final").glob("optimizer*"))
    final = root / "stages" / "train_moe" / "final"
    assert (final / "tokenizer.json").read_bytes() == (root / "data" / "tokenizer.json").read_bytes()
    transformers = pytest.importorskip("transformers")
    from aquila_ray.hf import export_hf

    hf_tok = transformers.AutoTokenizer.from_pretrained(export_hf(final, root.parent / "moe-hf"))
    eos = json.loads((root / "data" / "manifest.json").read_text())["eos_token_id"]
    assert hf_tok.eos_token_id == eos and hf_tok("中文 and English")["input_ids"]
    # all stages log to one W&B group: the run's name
    for stage in ("train_small", "train_large", "train_moe"):
        cfg_text = (root / "runs" / f"tinyrun.{stage}" / "train_config.yaml").read_text()
        assert "group: tinyrun" in cfg_text


@pytest.mark.ray
def test_stage_interrupted_after_training_resumes_without_new_steps(run: dict[str, Any]) -> None:
    """Delete train_moe's and evaluate's markers (as if the job died after training, before the marker):
    the rerun restores Ray Train's registered final checkpoint, trains no step, and ends where it was."""
    from aquila_ray.checkpoint import load_state_dict

    root: Path = run["root"]
    before = load_state_dict(root / "stages" / "train_moe" / "final")[0]
    rows_before = (root / "runs" / "tinyrun.train_moe" / "metrics.jsonl").read_text()
    kept = markers(root)
    for name in ("train_moe", "evaluate"):
        (root / "stages" / name / MARKER).unlink()
    run_efficientscale(run["cfg"], root)
    after = load_state_dict(root / "stages" / "train_moe" / "final")[0]
    assert all(bool((before[k] == after[k]).all()) for k in before)
    assert (root / "runs" / "tinyrun.train_moe" / "metrics.jsonl").read_text() == rows_before
    now = markers(root)
    for name in ("data", "train_small", "scale_up", "train_large", "scale_out"):
        assert now[name] == kept[name]

"""Dense trainer on a local Ray cluster with 2 CPU workers (gloo): metrics, exact resume, resize.

One reference run; the others are compared with it: a worker SIGKILLed from outside at a random step (Ray
Train restarts the group from the last registered checkpoint), the whole job dying and being rerun with
the same name, reruns at 1 worker after 2 and at 2 after 1, and the sharded checkpoint's state read back
from DeepSpeed's buffers after a resharded load. Runs are tiny (6 steps of 16 x 32 tokens) to fit a 2-core CI box.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import OutsideKill, check_resharded_load
from train_helpers import training_state as saved_training_state

from aquila_ray.checkpoint import load_state_dict
from aquila_ray.config.train import TrainConfig, build_train_config
from aquila_ray.data.synthetic import write_synthetic_shards
from aquila_ray.train import TrainResult, run_training
from aquila_ray.train.checkpointing import STATE_DIR, saved_chunks
from aquila_ray.train.metrics import read_metrics, read_wandb_history, wandb_run_files

pytestmark = pytest.mark.ray
RAY_CPUS = 4
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}

BASE = ["global_batch_tokens=512", "micro_batch_size=4", "steps=6", "checkpoint.every=2", "optimizer.lr=3e-3",
        "schedule.warmup_steps=1", "eval_every=3", "eval_max_sequences=16", "scaling.num_workers=2",
        "scaling.max_failures=1", "wandb.mode=offline"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def make_cfg(data_dir: Path, *extra: str) -> TrainConfig:
    return build_train_config({"model": "tiny", "data_dir": str(data_dir)}, [*BASE, *extra])


@pytest.fixture(scope="module")
def reference(ray_cluster: Any, data_dir: Path, storage: Path) -> TrainResult:
    return run_training(make_cfg(data_dir), storage, "reference")


def weights(result: TrainResult) -> dict[str, torch.Tensor]:
    assert result.checkpoint_path is not None
    return load_state_dict(result.checkpoint_path)[0]


def training_state(result: TrainResult) -> dict[str, torch.Tensor]:
    return saved_training_state(result.checkpoint_path or "")


def assert_resumed_at(result: TrainResult, kill_step: int, resumed_step: int) -> None:
    """Rows up to the resumed checkpoint predate the kill (kept from the first attempt); the rest follow it."""
    marker = next(Path(result.run_dir).glob(f"fault_injection-rank*-step{kill_step}.json"))
    killed_at = json.loads(marker.read_text())["time"]
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows if r["time"] < killed_at] == list(range(1, resumed_step + 1))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def test_dense_run_trains_and_logs(reference: TrainResult) -> None:
    rows = read_metrics(reference.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "consumed_tokens", "cumulative_flops"):
        assert all(key in r for r in rows), key
    assert rows[-1]["consumed_tokens"] == 6 * 512
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    ckpt = Path(reference.checkpoint_path or "")
    for name in ("config.json", "model.safetensors.index.json", "trainer_state.json", "train_config.json",
                 "rng-rank-00000.safetensors", "rng-rank-00001.safetensors"):
        assert (ckpt / name).is_file(), name
    files = wandb_run_files(reference.run_dir)
    assert files, "no offline W&B run file"
    history = read_wandb_history(files[-1])
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["loss"] == pytest.approx(rows[-1]["loss"])
    assert all("mfu" in h and "tokens_per_s" in h and "cumulative_flops" in h for h in history)
    import aquila_ray

    model = aquila_ray.load_model(str(ckpt))
    assert model(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 512)


def test_checkpoint_holds_one_state_file_per_rank(reference: TrainResult) -> None:
    ckpt = Path(reference.checkpoint_path or "")
    files = sorted((ckpt / STATE_DIR).glob("*.safetensors"))
    assert [f.name for f in files] == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    sizes = [f.stat().st_size for f in files]
    assert all(abs(size - sum(sizes) / 2) < 0.1 * sum(sizes) for size in sizes), sizes  # ~1/N each
    chunks = saved_chunks(ckpt)
    assert {k.split("/")[0] for k in chunks} == {"weight", "exp_avg", "exp_avg_sq"}
    full = training_state(reference)
    for f in files:  # no file holds the whole state: each holds a strict part of the elements
        held = sum(n for parts in chunks.values() for _, n, path in parts if path == f)
        assert 0 < held < sum(t.numel() for t in full.values())


def test_model_export_equals_the_training_weights(reference: TrainResult, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    exported, state = weights(reference), training_state(reference)
    assert exported.keys() == {k.split("/", 1)[1] for k in state if k.startswith("weight/")}
    assert all(torch.equal(t.reshape(-1), state[f"weight/{k}"]) for k, t in exported.items())
    # the same export, consolidated afterwards from the sharded state alone
    from jobs.export_checkpoint import main as export_main

    export_main([reference.checkpoint_path or "", "--output", str(tmp_path / "model"), "--dry-run"])
    plan = capsys.readouterr().out
    assert f'"tensors": {len(exported)}' in plan and '"saved_by_ranks": 2' in plan
    export_main([reference.checkpoint_path or "", "--output", str(tmp_path / "model")])
    assert_identical(load_state_dict(tmp_path / "model")[0], exported)


def test_worker_killed_from_outside_resumes_bit_identical(reference: TrainResult, data_dir: Path,
                                                          storage: Path) -> None:
    seed = int(time.time())
    after_step = random.Random(seed).randint(1, 3)
    print(f"outside kill after step {after_step} (seed {seed})")
    name = "killed-outside"
    kill = OutsideKill(storage / name / "metrics.jsonl", after_step, seed)
    result = run_training(make_cfg(data_dir), storage, name)
    assert kill.killed_at is not None, "no worker was killed"
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["time"] > kill.killed_at
    assert_identical(weights(result), weights(reference))
    assert_identical(training_state(result), training_state(reference))


def test_job_dies_and_rerun_with_same_name_resumes(reference: TrainResult, data_dir: Path, storage: Path) -> None:
    cfg = make_cfg(data_dir, "fault_injection=0@5", "scaling.max_failures=0")
    with pytest.raises(Exception, match="(?i)fail|died|exit"):
        run_training(cfg, storage, "job-dies")
    result = run_training(cfg, storage, "job-dies")  # the same command again
    assert_resumed_at(result, kill_step=5, resumed_step=4)
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_identical(weights(result), weights(reference))


@pytest.fixture(scope="module")
def resized(reference: TrainResult, data_dir: Path, storage: Path) -> TrainResult:
    """Killed at step 5 with 2 workers, rerun with 1: resumes from the 2-worker step-4 checkpoint."""
    with pytest.raises(Exception, match="(?i)fail|died|exit"):
        run_training(make_cfg(data_dir, "fault_injection=0@5", "scaling.max_failures=0"), storage, "resize")
    return run_training(make_cfg(data_dir, "scaling.num_workers=1"), storage, "resize")


def assert_continues(result: TrainResult, reference: TrainResult, resumed: int, worlds: list[int]) -> None:
    """The same samples in the same order as the reference run, and losses within fp32 reduction noise."""
    rows, ref_rows = read_metrics(result.metrics_path), read_metrics(reference.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["world_size"] for r in rows] == worlds
    assert [r["grad_accum"] for r in rows] == [4 // w for w in worlds]
    assert [r["sample_hash"] for r in rows] == [r["sample_hash"] for r in ref_rows]
    for r, ref in zip(rows[resumed:], ref_rows[resumed:], strict=True):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # The optimizer state was restored: weights stay within fp32 reduction-order noise of the reference
    # (a fresh Adam state would move them by ~lr per element at the first resumed step).
    w, ref_w = weights(result), weights(reference)
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-5)


def test_resume_at_fewer_workers_keeps_samples_and_optimizer(resized: TrainResult, reference: TrainResult) -> None:
    assert_resumed_at(resized, kill_step=5, resumed_step=4)
    assert_continues(resized, reference, resumed=4, worlds=[2, 2, 2, 2, 1, 1])


def test_resume_at_more_workers_keeps_samples_and_optimizer(reference: TrainResult, data_dir: Path,
                                                            storage: Path) -> None:
    cfg = make_cfg(data_dir, "scaling.num_workers=1", "fault_injection=0@3", "scaling.max_failures=0")
    with pytest.raises(Exception, match="(?i)fail|died|exit"):
        run_training(cfg, storage, "grow")
    result = run_training(make_cfg(data_dir), storage, "grow")
    assert_resumed_at(result, kill_step=3, resumed_step=2)
    assert_continues(result, reference, resumed=2, worlds=[1, 1, 2, 2, 2, 2])


@pytest.mark.parametrize("source, workers", [("reference", 1), ("resized", 2)], ids=["2->1", "1->2"])
def test_resharded_load_restores_every_moment_exactly(source: str, workers: int, request: pytest.FixtureRequest,
                                                      data_dir: Path, storage: Path, tmp_path: Path) -> None:
    """Read back from DeepSpeed's buffers: every slice a rank now owns equals the saved tensors, every
    element is loaded by exactly one rank, and the module's weights equal the saved masters."""
    result: TrainResult = request.getfixturevalue(source)
    saved = training_state(result)
    records = check_resharded_load(make_cfg(data_dir, f"scaling.num_workers={workers}"), result.checkpoint_path or "",
                                   workers, tmp_path, storage, f"reshard-{source}-{workers}")
    assert all(r["mismatched"] == [] and r["weights_mismatched"] == [] for r in records), records
    assert sum(r["elements"] for r in records) == sum(t.numel() for t in saved.values())
    step = json.loads((Path(result.checkpoint_path or "") / "trainer_state.json").read_text())["optimizer_step"]
    assert all(r["optimizer_steps"] == [float(step)] for r in records)


@pytest.mark.slow
def test_elastic_range_starts_with_the_workers_that_fit(ray_cluster: Any, data_dir: Path, storage: Path) -> None:
    # 4 logical CPUs, 3 per worker: only 1 of the 2 allowed workers fits; the elastic run trains with it.
    cfg = make_cfg(data_dir, "scaling.min_workers=1", "scaling.cpus_per_worker=3", "steps=2")
    result = run_training(cfg, storage, "elastic")
    rows = read_metrics(result.metrics_path)
    assert [(r["step"], r["world_size"], r["grad_accum"]) for r in rows] == [(1, 1, 4), (2, 1, 4)]


@pytest.mark.slow
def test_zero2_killed_worker_resumes_bit_identical(ray_cluster: Any, data_dir: Path, storage: Path) -> None:
    ref = run_training(make_cfg(data_dir, "scaling.zero_stage=2"), storage, "zero2-reference")
    result = run_training(make_cfg(data_dir, "scaling.zero_stage=2", "fault_injection=0@5"), storage, "zero2-killed")
    assert_resumed_at(result, kill_step=5, resumed_step=4)
    assert_identical(weights(result), weights(ref))
    assert_identical(training_state(result), training_state(ref))

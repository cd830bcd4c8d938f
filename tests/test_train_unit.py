"""Trainer pieces without Ray: data order, batch math, schedules, config validation, metrics readers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aquila_ray.config import get_preset
from aquila_ray.config.train import ScheduleConfig, TrainConfig, build_train_config
from aquila_ray.data.dataset import TokenDataset, rank_batch, stream_indices
from aquila_ray.data.synthetic import write_synthetic_shards
from aquila_ray.errors import CheckpointError, ConfigError, DataError
from aquila_ray.train import plan, run_training, validate
from aquila_ray.train.metrics import MetricsLogger, read_metrics, wandb_run_id
from aquila_ray.train.schedule import lr_at


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("data"), num_train=50, num_validation=8, seq_len=16)


def cfg_for(data_dir: Path, *overrides: str) -> TrainConfig:
    return build_train_config({"model": "tiny", "data_dir": str(data_dir)},
                              ["global_batch_tokens=128", "micro_batch_size=2", *overrides])


# ---- data order -------------------------------------------------------------------------------------------

def test_dataset_addresses_across_shards(data_dir: Path) -> None:
    ds = TokenDataset(data_dir)
    assert len(ds) == 50
    from aquila_ray.data.shards import read_manifest, read_token_shard

    rows = np.concatenate([read_token_shard(p) for p in read_manifest(data_dir).shard_paths("train")])
    idx = np.array([49, 0, 17, 33, 16])
    np.testing.assert_array_equal(ds.get(idx), rows[idx])


def test_stream_is_a_permutation_per_epoch_and_seeded() -> None:
    first = stream_indices(50, seed=3, start=0, count=50)
    assert sorted(first.tolist()) == list(range(50))
    second = stream_indices(50, seed=3, start=50, count=50)
    assert sorted(second.tolist()) == list(range(50)) and not np.array_equal(first, second)
    np.testing.assert_array_equal(stream_indices(50, 3, 45, 10), np.concatenate([first[45:], second[:5]]))
    assert not np.array_equal(first, stream_indices(50, seed=4, start=0, count=50))


@pytest.mark.parametrize("world_sizes", [(1, 2), (2, 4), (1, 8)])
def test_global_batch_does_not_depend_on_world_size(data_dir: Path, world_sizes: tuple[int, int]) -> None:
    ds = TokenDataset(data_dir)
    for consumed in (0, 8, 48):  # 48 straddles the epoch boundary
        batches = []
        for w in world_sizes:
            parts = [rank_batch(ds, 0, consumed, 8, r, w) for r in range(w)]
            batches.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
        np.testing.assert_array_equal(batches[0][0], batches[1][0])
        np.testing.assert_array_equal(batches[0][1], batches[1][1])


# ---- schedules --------------------------------------------------------------------------------------------

def test_warmup_then_cosine_to_min() -> None:
    sched = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, 1.0, sched, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lr_at(20, 1.0, sched, 20) == pytest.approx(0.1)
    assert lr_at(12, 1.0, sched, 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_constant_schedule() -> None:
    sched = ScheduleConfig(kind="constant", warmup_steps=2)
    assert [lr_at(s, 2.0, sched, 10) for s in range(4)] == [1.0, 2.0, 2.0, 2.0]


# ---- config and batch math --------------------------------------------------------------------------------

def test_batch_math_and_plan(data_dir: Path) -> None:
    cfg = cfg_for(data_dir, "scaling.num_workers=2", "scaling.min_workers=1")
    assert cfg.batch_sequences(16) == 8
    p = plan(cfg, validate(cfg))
    assert p["grad_accum_per_worker_count"] == {1: 4, 2: 2}
    assert p["tokens"] == cfg.steps * 128
    # the plan's activation memory follows the setting the workers will run with
    full = plan(cfg_for(data_dir, "scaling.num_workers=2", "activation_checkpointing=full"), validate(cfg))
    assert p["activation_checkpointing"] == "none" and full["activation_checkpointing"] == "full"
    assert 0 < full["activation_mib_per_worker"] < p["activation_mib_per_worker"]


def test_batch_not_divisible_by_workers_fails(data_dir: Path) -> None:
    cfg = cfg_for(data_dir, "scaling.num_workers=3")
    with pytest.raises(ConfigError, match=r"global_batch_tokens=128 \(8 sequences of 16\) is not divisible by "
                                          r"num_workers=3 x micro_batch_size=2"):
        validate(cfg)
    with pytest.raises(ConfigError, match="not a multiple of the data's seq_len=16"):
        validate(cfg_for(data_dir, "global_batch_tokens=100"))


def test_elastic_range_checks_every_worker_count(data_dir: Path) -> None:
    cfg = cfg_for(data_dir, "scaling.num_workers=4", "scaling.min_workers=2")
    with pytest.raises(ConfigError, match=r"num_workers=3 x micro_batch_size=2.*\[2, 3, 4\]"):
        validate(cfg)


def test_expert_parallel_must_divide_experts_and_workers() -> None:
    with pytest.raises(ConfigError, match=r"expert_parallel=3 does not divide model.moe.num_experts=8; valid: a "
                                          r"divisor of 8"):
        build_train_config({"model": "tiny-moe"}, ["scaling.expert_parallel=3", "scaling.num_workers=3"])
    with pytest.raises(ConfigError, match=r"expert_parallel=4 does not divide the worker count\(s\) \[2\]"):
        build_train_config({"model": "tiny-moe"}, ["scaling.expert_parallel=4", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match="expert_parallel=2 needs an MoE model"):
        build_train_config({"model": "tiny"}, ["scaling.expert_parallel=2", "scaling.num_workers=2"])


def test_missing_shards_fail_with_data_error(tmp_path: Path) -> None:
    d = write_synthetic_shards(tmp_path / "d", num_train=10, num_validation=4, seq_len=16)
    next((d / "tokens" / "train").glob("*.arrow")).unlink()
    with pytest.raises(DataError, match="lists 1 shard\\(s\\) that do not exist"):
        validate(cfg_for(d))
    with pytest.raises(DataError, match="no manifest.json in .*prepare data first"):
        validate(cfg_for(tmp_path / "nowhere"))


def test_invalid_settings_fail_before_ray_starts(tmp_path: Path) -> None:
    import ray

    with pytest.raises(DataError, match="no manifest.json"):
        run_training(cfg_for(tmp_path / "nowhere"), tmp_path / "runs", "x")
    assert not ray.is_initialized()


def test_model_data_mismatches(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size=512 exceeds model.vocab_size=100"):
        validate(cfg_for(data_dir, "model.vocab_size=100"))
    with pytest.raises(ConfigError, match="seq_len=16 exceeds model.max_seq_len=8"):
        validate(cfg_for(data_dir, "model.max_seq_len=8"))
    with pytest.raises(CheckpointError, match="does not exist"):
        validate(cfg_for(data_dir, "init=checkpoint", f"init_from={tmp_path / 'none'}"))
    with pytest.raises(ConfigError, match="init='upcycle' needs an MoE model"):
        cfg_for(data_dir, "init=upcycle", "init_from=/x")


def test_evaluation_inputs_are_checked_before_any_worker(data_dir: Path, tmp_path: Path) -> None:
    """eval_tasks is read and parsed, and the data's tokenizer looked for, by validate (before workers start),
    so a bad task file or data without a tokenizer fails at once, not after the last training step."""
    with pytest.raises(DataError, match=r"eval_tasks='sample' needs the data's tokenizer, and .* has no "
                                        r"tokenizer.json"):
        validate(cfg_for(data_dir, "eval_tasks=sample"))  # synthetic shards carry no tokenizer
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(DataError, match=r"tasks.jsonl:1: expected \{'question': str, 'choices': \[>= 2 str\]"):
        validate(cfg_for(data_dir, f"eval_tasks={bad}"))
    with pytest.raises(DataError, match=r"eval_tasks='file:///nowhere/tasks.jsonl': no such file"):
        validate(cfg_for(data_dir, "eval_tasks=file:///nowhere/tasks.jsonl"))


def test_config_fields_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"OptimizerConfig.lr=0.0 must be > 0"):
        build_train_config({}, ["optimizer.lr=0"])
    with pytest.raises(ConfigError, match=r"scaling.zero_stage=3 is not valid; choose one of \[0, 1, 2\]"):
        build_train_config({}, ["scaling.zero_stage=3"])
    with pytest.raises(ConfigError, match="min_workers=3 exceeds num_workers=2"):
        build_train_config({}, ["scaling.num_workers=2", "scaling.min_workers=3"])
    with pytest.raises(ConfigError, match=r"activation_checkpointing='some' is not valid; choose one of "
                                          r"\['none', 'full', 'selective'\]"):
        build_train_config({}, ["activation_checkpointing=some"])
    with pytest.raises(ConfigError, match="zero_stage=0 with use_gpu=true is not valid"):
        build_train_config({}, ["scaling.use_gpu=true", "scaling.zero_stage=0"])
    with pytest.raises(ConfigError, match="unknown field"):
        build_train_config({"stepz": 3})


def test_yaml_overlay_with_preset_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("model: {preset: tiny-moe, hidden_size: 96}\nsteps: 7\noptimizer: {lr: 0.01}\n")
    cfg = build_train_config(path, ["model.num_layers=3", "schedule.kind=constant"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.moe is not None) == (96, 3, True)
    assert (cfg.steps, cfg.optimizer.lr, cfg.schedule.kind) == (7, 0.01, "constant")


# ---- metrics ----------------------------------------------------------------------------------------------

def test_metrics_file_is_truncated_on_resume(tmp_path: Path) -> None:
    from aquila_ray.config.train import WandbConfig

    off = WandbConfig(enabled=False)
    logger = MetricsLogger(tmp_path, "r", off, {}, 0, 10, 100)
    for s in range(1, 6):
        logger.log({"step": s, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 1.0, "mfu": 0.0,
                    "consumed_tokens": s})
    logger.close()
    MetricsLogger(tmp_path, "r", off, {}, 3, 10, 100).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_wandb_id_is_stable() -> None:
    assert wandb_run_id("stage-1/a b") == wandb_run_id("stage-1/a b")
    assert wandb_run_id("a") != wandb_run_id("b")
    json.dumps(wandb_run_id("x"))


def test_job_dry_run_prints_config_and_plan(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.train import main

    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: tiny\ndata_dir: {data_dir}\nglobal_batch_tokens: 128\nmicro_batch_size: 2\n")
    main(["--config", str(cfg), "--set", "steps=3", "--storage-path", str(tmp_path / "runs"), "--run-name", "r",
          "--dry-run"])
    out = capsys.readouterr().out
    assert '"steps": 3' in out and '"global_batch_sequences": 8' in out
    assert not (tmp_path / "runs").exists()


def test_wandb_mode_is_offline_unless_the_user_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from aquila_ray.config.train import WandbConfig
    from aquila_ray.train.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(WandbConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(WandbConfig()) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit WANDB_MODE wins over the key
    assert wandb_mode(WandbConfig()) == "offline"
    assert wandb_mode(WandbConfig(mode="disabled")) == "disabled"  # the config wins over the environment
    assert wandb_mode(WandbConfig(enabled=False, mode="online")) == "disabled"


# ---- gradient clipping on a real DeepSpeed engine ---------------------------------------------------------

_CLIP_CHILD = """
import json, os, socket, sys
import torch
import torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
from aquila_ray.config import from_dict
from aquila_ray.config.train import TrainConfig
from aquila_ray.model import build_model
from aquila_ray.train.engine import _torch_optimizer, build_engine
from aquila_ray.train.worker import _grad_norm
results = {}
for clip, cfg_dict in json.loads(sys.argv[1]).items():  # one engine per config, in one process
    cfg = from_dict(TrainConfig, cfg_dict)
    model = build_model(cfg.model, seed=0)
    engine = build_engine(model, cfg, 2, 1, 1)
    x = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    out = engine(x[:, :-1], labels=x[:, 1:])
    engine.backward(out.total_loss)
    norm = _grad_norm(engine.module)
    engine.step()
    opt = _torch_optimizer(engine)
    m = [opt.state[p]["exp_avg"].norm() for g in opt.param_groups for p in g["params"] if p in opt.state]
    results[clip] = {"grad_norm": norm, "exp_avg_norm": float(torch.linalg.vector_norm(torch.stack(m))),
                     "beta1": opt.param_groups[0]["betas"][0]}
print(json.dumps(results))
"""
CLIPS = (0.0, 1e-3, 1.0)


@pytest.fixture(scope="module")
def clipped_steps(data_dir: Path) -> dict[str, dict[str, float]]:
    """One real DeepSpeed step per grad_clip value, all in one child process (one process start)."""
    import subprocess
    import sys

    from aquila_ray.config import to_dict

    cfgs = {str(c): to_dict(cfg_for(data_dir, f"optimizer.grad_clip={c}")) for c in CLIPS}
    out = subprocess.run([sys.executable, "-c", _CLIP_CHILD, json.dumps(cfgs)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("clip", CLIPS)
def test_gradient_clipping_bounds_the_step(clipped_steps: dict[str, dict[str, float]], clip: float) -> None:
    """After one step, Adam's first moment is (1 - beta1) times the gradient the optimizer saw: with
    grad_clip=c below the gradient norm its norm is (1 - beta1) * c; with clipping off (0), (1 - beta1) * |g|.
    (DeepSpeed's own default clips at 1.0, so "off" has to be passed explicitly.)"""
    r = clipped_steps[str(clip)]
    assert r["grad_norm"] > 2 * max(clip, 1.0)  # the tiny model's first gradient is above every clip here
    seen = clip if clip else r["grad_norm"]
    assert r["exp_avg_norm"] == pytest.approx((1 - r["beta1"]) * seen, rel=1e-4)


def test_read_metrics_skips_only_a_torn_last_line(tmp_path: Path) -> None:
    """One reader for the trainer and the report: no file is no rows, a torn last line (a crash mid-write) is
    left out, a bad line before it is an error naming the line."""
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_metrics(path)


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter"}


def test_no_collective_gets_a_tensor_moved_to_cpu() -> None:
    """On GPU clusters the default group is cpu:gloo,cuda:nccl; a collective on a tensor just moved to the
    CPU would still work (Gloo) but would pull device data through host memory and TCP. None may."""
    import ast

    import aquila_ray.train as train_pkg
    from aquila_ray.train.trainer import process_group_backend

    assert process_group_backend(True) == "cpu:gloo,cuda:nccl" and process_group_backend(False) == "cpu:gloo"
    offenders, calls = [], 0
    for path in sorted(Path(train_pkg.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in COLLECTIVES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "dist"):
                calls += 1
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    src = ast.unparse(arg)
                    if ".cpu()" in src or "'cpu'" in src or '"cpu"' in src:
                        offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert calls >= 5  # the walk sees the trainer's collectives
    assert not offenders, offenders


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_init_checkpoint_reads_only_this_ranks_tensors(preset: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """init=checkpoint builds on the meta device and reads each tensor the rank holds, once; an expert-
    parallel rank reads only its experts."""
    import torch

    from aquila_ray.checkpoint import CheckpointReader, save_model
    from aquila_ray.model import build_model
    from aquila_ray.moe import ExpertParallel
    from aquila_ray.train.engine import build_worker_model
    from aquila_ray.train.parallelize import ExpertParallelGroups

    source = build_model(get_preset(preset), seed=3)
    save_model(source, tmp_path / "init")
    cfg = build_train_config({"model": preset}, ["init=checkpoint", f"init_from={tmp_path / 'init'}"])
    reads: list[str] = []
    original = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: reads.append(name) or original(self, name))
    groups = None if source.config.moe is None else ExpertParallelGroups(ExpertParallel(size=2, rank=1), None, 2)
    model = build_worker_model(cfg, cfg.model, groups, torch.device("cpu"))
    expected = source.state_dict()
    held = model.state_dict()
    assert sorted(reads) == sorted(held)  # every held tensor read once, nothing else
    assert all(torch.equal(t, expected[k]) for k, t in held.items())
    if groups is not None:
        assert {int(k.split(".")[4]) for k in held if ".experts." in k} == {4, 5, 6, 7}


def test_gpu_deepspeed_config_accumulates_bf16_gradients_in_fp32() -> None:
    """What a GPU worker hands DeepSpeed (not runnable here): bf16 weights, fp32 gradient accumulation, and
    ZeRO even for one GPU (DeepSpeed accumulates in fp32 only inside its ZeRO optimizers)."""
    from aquila_ray.train.engine import deepspeed_config, effective_zero_stage

    gpu = build_train_config({}, ["scaling.use_gpu=true"])
    conf = deepspeed_config(gpu, micro_batch=2, grad_accum=4, world_size=1)
    assert conf["bf16"] == {"enabled": True} and conf["data_types"] == {"grad_accum_dtype": "fp32"}
    assert conf["zero_optimization"]["stage"] == effective_zero_stage(gpu, 1) == 1
    cpu = build_train_config({})
    conf = deepspeed_config(cpu, micro_batch=2, grad_accum=4, world_size=1)
    assert conf["bf16"] == {"enabled": False} and "data_types" not in conf
    assert conf["zero_optimization"]["stage"] == 0


def test_state_files_are_bounded_and_load_back(tmp_path: Path) -> None:
    """A rank's state goes into files of about checkpoint.state_file_bytes, and loads back exactly from
    them."""
    import torch

    from aquila_ray.model import build_model
    from aquila_ray.train.checkpointing import (
        STATE_KINDS,
        Fragment,
        load_sharded_state,
        save_sharded_state,
        state_file_index,
        state_key,
    )

    model = build_model(get_preset("tiny"), seed=0)
    params = dict(model.named_parameters())
    saved = {state_key(kind, n): torch.randn(p.numel()) for n, p in params.items() for kind in STATE_KINDS}
    limit = 100_000
    index = state_file_index(model.config, 1, limit)
    save_sharded_state(tmp_path, {k: Fragment(t, 0, t.numel()) for k, t in saved.items()}, index)
    files = sorted((tmp_path / "state").glob("*.safetensors"))
    largest = max(4 * t.numel() for t in saved.values())
    assert len(files) == max(index.values()) > 3
    assert all(f.stat().st_size <= max(limit, largest) + 16_384 for f in files)  # + the JSON header
    loaded = {k: torch.zeros_like(t) for k, t in saved.items()}
    load_sharded_state(tmp_path, {k: Fragment(t, 0, t.numel()) for k, t in loaded.items()})
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_streamed_state_files_equal_dcps_own_and_load_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """StreamingStateWriter writes what DCP's HuggingFaceStorageWriter writes (same keys, dtypes, slices,
    sharding metadata), from views into larger buffers (the ZeRO case the stock writer clones), fp32 and bf16,
    in pieces of STAGING_BYTES, and HuggingFaceStorageReader loads it back exactly, resharded."""
    import json

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from aquila_ray.train import checkpointing
    from aquila_ray.train.checkpointing import SHARDING_KEY, Fragment, load_sharded_state, save_sharded_state

    monkeypatch.setattr(checkpointing, "STAGING_BYTES", 100)  # tensors go out in pieces, one ragged
    flat, half = torch.randn(2000), torch.randn(64).to(torch.bfloat16)
    frags = {"weight/a": Fragment(flat[10:400], 100, 490), "exp_avg/a": Fragment(flat[500:900], 0, 400),
             "weight/b": Fragment(half[5:9], 2, 6), "exp_avg/b": Fragment(flat[:0], 0, 0)}
    index = {"weight/a": 1, "exp_avg/a": 2, "weight/b": 2, "exp_avg/b": 2}
    save_sharded_state(tmp_path / "ours", frags, index)
    dcp.save(dict(frags), storage_writer=HuggingFaceStorageWriter(str(tmp_path / "dcp"), save_distributed=True,
                                                                  fqn_to_index_mapping=index))
    ours = sorted((tmp_path / "ours" / "state").glob("*.safetensors"))
    assert [f.name for f in ours] == sorted(f.name for f in (tmp_path / "dcp").glob("*.safetensors"))
    for path in ours:
        with safe_open(str(path), "pt") as a, safe_open(str(tmp_path / "dcp" / path.name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert json.loads(a.metadata()[SHARDING_KEY]) == json.loads(b.metadata()[SHARDING_KEY])
            for key in a.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                assert x.dtype == y.dtype and torch.equal(x, y) and torch.equal(x, frags[key].local_tensor)
    # read back as two ranks' halves of weight/a would be (resharded onto other slices)
    lo, hi = torch.zeros(200), torch.zeros(190)
    load_sharded_state(tmp_path / "ours", {"weight/a": Fragment(lo, 100, 490)})
    load_sharded_state(tmp_path / "ours", {"weight/a": Fragment(hi, 300, 490)})
    assert torch.equal(torch.cat([lo, hi]), flat[10:400])


def test_a_resume_reads_only_the_byte_ranges_it_loads(tmp_path: Path) -> None:
    """RangeStateReader through a pyarrow filesystem (here an fsspec one that counts bytes, standing in for
    S3): loading a 1/8 slice of a saved tensor reads its headers and that slice, not the files."""
    import pyarrow.fs as pafs
    import torch
    from fsspec.implementations.local import LocalFileSystem

    from aquila_ray.train.checkpointing import Fragment, load_sharded_state, save_sharded_state

    class Counting(LocalFileSystem):  # type: ignore[misc]
        bytes_read = 0

        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
            inner, fs = super()._open(path, mode, **kwargs), self

            class File:
                def __getattr__(self, name: str) -> Any:
                    return getattr(inner, name)

                def read(self, n: int = -1) -> bytes:
                    b = inner.read(n)
                    fs.bytes_read += len(b)
                    return b  # type: ignore[no-any-return]

                def readinto(self, b: Any) -> int:
                    n = inner.readinto(b)
                    fs.bytes_read += n
                    return n  # type: ignore[no-any-return]

            return File()

    weights, moments = torch.randn(80_000), torch.randn(80_000)
    save_sharded_state(tmp_path, {"weight/w": Fragment(weights, 0, 80_000), "exp_avg/w": Fragment(moments, 0, 80_000)})
    total = sum(f.stat().st_size for f in (tmp_path / "state").glob("*.safetensors"))
    counting = Counting()
    part = torch.zeros(10_000)
    load_sharded_state(str(tmp_path), {"weight/w": Fragment(part, 30_000, 80_000)},
                       filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(counting)))
    assert torch.equal(part, weights[30_000:40_000])
    assert 40_000 <= counting.bytes_read < 40_000 + 4096 < total / 10  # the slice and the header


def test_checkpoints_carry_the_data_tokenizer_or_none_with_a_warning(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 0 reads the data's tokenizer once: a usable one becomes the two Hugging Face files every
    checkpoint gets; none (synthetic shards) or one without an EOS token gives none, with a warning for the
    latter, and never fails the run."""
    from tokenizers import Tokenizer, models

    from aquila_ray.train.worker import _data_tokenizer

    data = write_synthetic_shards(tmp_path / "data", num_train=8, num_validation=2, seq_len=16)
    assert _data_tokenizer(cfg_for(data), None) == {}
    no_eos = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    no_eos.save(str(data / "tokenizer.json"))
    assert _data_tokenizer(cfg_for(data), None) == {}
    assert "checkpoints will carry no tokenizer" in capsys.readouterr().out
    good = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<|pad|>": 1, "a": 2}, unk_token="a"))
    good.save(str(data / "tokenizer.json"))
    files = _data_tokenizer(cfg_for(data), 0)
    assert files["tokenizer.json"] == (data / "tokenizer.json").read_bytes()
    config = json.loads(files["tokenizer_config.json"])
    assert (config["eos_token"], config["pad_token"], config["model_max_length"]) == ("<|endoftext|>", "<|pad|>", 128)

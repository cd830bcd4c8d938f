"""The driver side of a training run: check everything up front, then a Ray Train V2 ``TorchTrainer``.

``run_training(cfg, storage_path, run_name)`` validates the config against the data and the init checkpoint
(before any worker starts), writes the run's resolved config, builds ``ScalingConfig`` (elastic when
``scaling.min_workers`` is set), ``RunConfig(name=run_name, storage_path=...)`` with ``FailureConfig`` and
``CheckpointConfig``, and runs ``aquila_ray.train.worker.train_loop_per_worker``. A rerun with the same
run name and storage path resumes from the run's last registered checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aquila_ray.checkpoint import CheckpointReader
from aquila_ray.config.base import to_dict
from aquila_ray.config.model import ModelConfig
from aquila_ray.config.train import TrainConfig
from aquila_ray.data.shards import Manifest, join_location, read_bytes, read_manifest
from aquila_ray.errors import ConfigError, DataError
from aquila_ray.eval import load_tasks, tasks_location
from aquila_ray.hf.tokenizer import TOKENIZER_NAME
from aquila_ray.plan import activation_bytes
from aquila_ray.train.metrics import METRICS_NAME, METRICS_PARTS, read_run_metrics

RUN_CONFIG_NAME = "train_config.yaml"
WANDB_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_DIR")


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    checkpoint_path: str | None
    """The last registered checkpoint (a model checkpoint: ``aquila_ray.load_model`` opens it)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last row of metrics.jsonl."""
    metrics_path: str = ""
    """The run's metrics.jsonl (one row per step); on remote storage its ``metrics/`` parts (read them with
    ``read_run_metrics(run_dir)``)."""
    run_dir: str = ""
    """``storage_path/run_name``: Ray Train's checkpoints, metrics.jsonl (remote: metrics/), wandb/,
    train_config.yaml (local storage)."""
    checkpoint: Any = None
    """The last registered ``ray.train.Checkpoint`` (its filesystem reaches object storage too)."""


def _shape(cfg: ModelConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    d.pop("extra", None)
    return d


def validate(cfg: TrainConfig) -> Manifest:
    """Every check that needs the data or the init checkpoint; raises ConfigError / DataError /
    CheckpointError naming the field, the value and what is valid. Runs in the driver, before workers."""
    if not cfg.data_dir:
        raise ConfigError("TrainConfig.data_dir is empty; set it to a prepared data directory "
                          "(python -m jobs.prepare_data --output DIR)")
    manifest = read_manifest(cfg.data_dir)
    if "train" not in manifest.splits or manifest.splits["train"].num_sequences == 0:
        raise DataError(f"{cfg.data_dir}/manifest.json has no train sequences; prepare data first")
    if not manifest.shard_paths("train"):
        raise DataError(f"{cfg.data_dir}/manifest.json lists no train shards")
    if manifest.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"the data's seq_len={manifest.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
                          f"set model.max_seq_len >= {manifest.seq_len} or pack shorter sequences")
    if manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer's vocab_size={manifest.vocab_size} exceeds model.vocab_size="
                          f"{cfg.model.vocab_size}; set model.vocab_size >= {manifest.vocab_size}")
    cfg.batch_sequences(manifest.seq_len)
    if cfg.eval_every >= 0:
        val = manifest.splits.get("validation")
        if val is None or val.num_sequences == 0:
            raise DataError(f"{cfg.data_dir}/manifest.json has no validation sequences; prepare a validation "
                            f"split or set eval_every=-1 to train without validation")
    if cfg.eval_tasks is not None:  # the workers score them after the last step: fail now, not then
        load_tasks(str(tasks_location(cfg.eval_tasks)))
        if read_bytes(join_location(cfg.data_dir, TOKENIZER_NAME)) is None:
            raise DataError(f"TrainConfig.eval_tasks={cfg.eval_tasks!r} needs the data's tokenizer, and "
                            f"{cfg.data_dir} has no {TOKENIZER_NAME} (synthetic shards have none); set "
                            f"eval_tasks=null or train on data from python -m jobs.prepare_data")
    if cfg.init in ("checkpoint", "upcycle"):
        # every shard's digest is checked here, once, so the workers read it with verify=False
        reader = CheckpointReader(cfg.init_from, verify=True)  # type: ignore[arg-type]
        src = reader.config
        if cfg.init == "checkpoint" and _shape(src) != _shape(cfg.model):
            diff = {k: (v, _shape(cfg.model)[k]) for k, v in _shape(src).items() if _shape(cfg.model)[k] != v}
            raise ConfigError(f"TrainConfig.init_from={cfg.init_from!r} holds a different model shape than "
                              f"TrainConfig.model: (checkpoint, config) = {diff}; use the checkpoint's shape")
        if cfg.init == "upcycle":
            if src.moe is not None:
                raise ConfigError(f"TrainConfig.init='upcycle' needs a dense checkpoint; {cfg.init_from!r} is "
                                  f"already MoE (use init=checkpoint)")
            dense = {**_shape(cfg.model), "moe": None}
            if _shape(src) != dense:
                diff = {k: (v, dense[k]) for k, v in _shape(src).items() if dense[k] != v}
                raise ConfigError(f"TrainConfig.init_from={cfg.init_from!r} does not match model without its MoE "
                                  f"section: (checkpoint, config) = {diff}")
    if cfg.scaling.use_gpu and cfg.peak_flops_per_worker is None:
        pass  # MFU then uses the H100 bf16 peak; set peak_flops_per_worker for other devices
    return manifest


def plan(cfg: TrainConfig, manifest: Manifest | None = None) -> dict[str, Any]:
    """What a run will do (for --dry-run): batch math, tokens, FLOPs, worker counts."""
    seq_len = manifest.seq_len if manifest is not None else cfg.model.max_seq_len
    batch = cfg.batch_sequences(seq_len)
    counts = cfg.scaling.worker_counts()
    return {
        "model": cfg.model.describe() if hasattr(cfg.model, "describe") else to_dict(cfg.model),
        "params": cfg.model.num_params(), "active_params": cfg.model.num_params(active=True),
        "seq_len": seq_len, "global_batch_sequences": batch, "global_batch_tokens": cfg.global_batch_tokens,
        "grad_accum_per_worker_count": {w: batch // w // cfg.micro_batch_size for w in counts},
        "steps": cfg.steps, "tokens": cfg.steps * cfg.global_batch_tokens,
        "train_flops": cfg.steps * cfg.global_batch_tokens * cfg.model.flops_per_token(seq_len),
        "train_sequences": manifest.splits["train"].num_sequences if manifest is not None else None,
        "epochs": (cfg.steps * batch / manifest.splits["train"].num_sequences) if manifest is not None else None,
        "workers": counts, "zero_stage": cfg.scaling.zero_stage, "expert_parallel": cfg.scaling.expert_parallel,
        "activation_checkpointing": cfg.activation_checkpointing,
        # what each worker's forward keeps for backward, per micro-batch (bf16 on GPU, fp32 on CPU)
        "activation_mib_per_worker": round(sum(activation_bytes(
            cfg.model, cfg.micro_batch_size * seq_len, cfg.activation_checkpointing,
            2 if cfg.scaling.use_gpu else 4).values()) / 1024**2, 2),
    }


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend per device: with GPUs, NCCL for CUDA tensors and Gloo for the CPU ones
    (metric sums, sample fingerprints, DCP's plan exchange), so no CPU tensor meets an NCCL-only group."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "cpu:gloo"


def run_dir_for(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}"


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def run_training(cfg: TrainConfig, storage_path: str | os.PathLike[str], run_name: str,
                 ray_address: str | None = None) -> TrainResult:
    """Train ``cfg`` on Ray Train; rerunning with the same ``storage_path`` and ``run_name`` resumes.

    Returns the last registered checkpoint, the last metrics row and the metrics file. Raises ConfigError /
    DataError / CheckpointError before any worker starts on bad settings; a run that exhausts
    ``scaling.max_failures`` raises Ray Train's TrainingFailedError.
    """
    # deferred: Ray Train (~2 s) and the worker loop (its engine and MoE code, ~1 s) are needed only to run;
    # importing aquila_ray.train (plan, validate, --dry-run) must not load them
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from aquila_ray.train.worker import train_loop_per_worker

    if not run_name or "/" in run_name:
        raise ConfigError(f"run_name={run_name!r} must be a non-empty name without '/' (reruns with the same "
                          f"name resume)")
    # workers run in their own directories: relative paths must mean what they meant to the caller
    # (a data_dir URI such as s3://bucket/tokens is left as it is)
    local_data = cfg.data_dir and "://" not in cfg.data_dir
    cfg = dataclasses.replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()) if local_data else cfg.data_dir,
                              init_from=str(Path(cfg.init_from).resolve()) if cfg.init_from else None)
    validate(cfg)
    storage = str(storage_path)
    if _is_local(storage):
        storage = str(Path(storage.removeprefix("file://")).expanduser().resolve())
        log_dir = Path(run_dir_for(storage, run_name))
    else:  # remote storage: rank 0 writes metrics and W&B files on its node and uploads them to the run dir
        log_dir = Path.home() / "aquila_ray_runs" / run_name
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / RUN_CONFIG_NAME).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    if not ray.is_initialized():
        ray.init(address=ray_address)
    s = cfg.scaling
    workers: int | tuple[int, int] = (s.min_workers, s.num_workers) if s.min_workers else s.num_workers
    scaling = ScalingConfig(num_workers=workers, use_gpu=s.use_gpu,  # type: ignore[arg-type]
                            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})})
    env = {k: os.environ[k] for k in WANDB_ENV if k in os.environ}
    # Train V2 turns print() into a log record *and* tees it to a wrapped stdout: every console line twice
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    run_config = RunConfig(  # type: ignore[call-arg]  # Train V2's RunConfig (the 2.60 default)
        name=run_name, storage_path=storage,
        failure_config=FailureConfig(max_failures=s.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        worker_runtime_env={"env_vars": env},
    )
    trainer = TorchTrainer(
        train_loop_per_worker, torch_config=TorchConfig(backend=process_group_backend(s.use_gpu)),
        train_loop_config={"train": to_dict(cfg), "run_name": run_name, "log_dir": str(log_dir),
                           "remote_run_dir": None if _is_local(storage) else run_dir_for(storage, run_name)},
        scaling_config=scaling, run_config=run_config,
    )
    result = trainer.fit()
    if _is_local(storage):
        metrics_path, run_dir = str(log_dir / METRICS_NAME), str(log_dir)
    else:
        run_dir = run_dir_for(storage, run_name)
        metrics_path = f"{run_dir}/{METRICS_PARTS}"
    rows = read_run_metrics(run_dir)
    return TrainResult(checkpoint_path=result.checkpoint.path if result.checkpoint is not None else None,
                       metrics=rows[-1] if rows else dict(result.metrics or {}), metrics_path=metrics_path,
                       run_dir=run_dir, checkpoint=result.checkpoint)

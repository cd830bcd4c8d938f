"""The Ray Train worker loop: one process per worker, DeepSpeed engine, deterministic data, checkpoints.

Everything comes in through ``train_loop_per_worker(config)`` (no globals, STYLE.md rule 9). A step
consumes the next global batch of the sample stream (``aquila_ray.data.dataset``); this rank trains on its
contiguous slice in micro-batches (gradient accumulation = per-rank batch / micro_batch_size, so the global
batch in tokens stays fixed whatever the worker count). Every ``checkpoint.every`` steps every rank writes
the state it owns (``aquila_ray.train.checkpointing``) and reports it with ``ray.train.report``; Ray Train
merges the ranks' files into one registered checkpoint. A restarted worker group (failure, rerun of the job
with the same name, or a different worker count or expert-parallel size) resumes from
``ray.train.get_checkpoint()`` only, each rank reading the slices it now owns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.deterministic
from safetensors.torch import save_file
from tokenizers import Tokenizer

from aquila_ray.checkpoint import CheckpointWriter
from aquila_ray.config.base import from_dict, to_dict
from aquila_ray.config.train import TrainConfig
from aquila_ray.data.dataset import TokenDataset, rank_batch
from aquila_ray.data.shards import join_location, read_bytes, read_manifest
from aquila_ray.errors import ConversionError
from aquila_ray.eval import choice_counts, choice_summary, load_tasks, sequence_loss, tasks_location
from aquila_ray.hf.tokenizer import TOKENIZER_NAME, hf_tokenizer
from aquila_ray.train.checkpointing import (
    TRAIN_CONFIG_NAME,
    TRAINER_STATE_NAME,
    load_buffers,
    load_sharded_state,
    model_config_of,
    read_rng,
    read_trainer_state,
    rng_name,
    save_buffers,
    save_sharded_state,
    state_file_index,
    write_json,
)
from aquila_ray.train.engine import (
    ParallelDims,
    build_engine,
    build_worker_model,
    create_parallel_groups,
    effective_zero_stage,
    finish_load,
    iter_model_tensors,
    optimizer_step,
    owned_state,
    set_lr,
)
from aquila_ray.train.metrics import MetricsLogger, router_metrics, router_telemetry
from aquila_ray.train.parallelize import balance_experts
from aquila_ray.train.schedule import lr_at

CPU_PEAK_FLOPS = 1e12
GPU_PEAK_FLOPS = 989e12  # H100 SXM bf16 dense


def _maybe_inject_fault(cfg: TrainConfig, rank: int, step: int, log_dir: Path) -> None:
    """Testing hook (TrainConfig.fault_injection): SIGKILL this process once at RANK@STEP."""
    if cfg.fault_injection is None:
        return
    r, s = (int(x) for x in cfg.fault_injection.split("@"))
    marker = log_dir / f"fault_injection-rank{r}-step{s}.json"
    if rank == r and step == s and not marker.exists():
        _wait_for_reported_checkpoints()
        marker.write_text(json.dumps({"time": time.time(), "rank": r, "step": s, "pid": os.getpid()}))
        os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_reported_checkpoints(timeout_s: float = 300.0) -> None:
    """For the fault-injection hook: wait until every report this worker made has reached Ray Train's
    controller (an asynchronous upload to object storage can take seconds under load), then 2 s for the
    controller to register its checkpoint; otherwise the restarted run would sometimes resume from the one
    before it and tests would race. Reads Ray Train V2's worker context (internal, so a testing hook only);
    without it, only the fixed pause."""
    try:  # deferred: a Ray Train worker's internals, only in this testing hook
        from ray.train.v2._internal.execution.context import get_train_context

        ctx = get_train_context()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (ctx.current_report_index < ctx.report_call_index
                                               or not ctx.get_result_queue().empty()):
            time.sleep(0.1)
    except (ImportError, RuntimeError, AttributeError):
        pass
    time.sleep(2.0)


def _all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def validation(model: torch.nn.Module, data: TokenDataset, cfg: TrainConfig, dims: ParallelDims) -> dict[str, float]:
    """Mean next-token loss over the first validation sequences (``TrainConfig.eval_sequences``: the
    sequence cap and the token budget), split over ranks (every rank runs the same number of forwards:
    expert parallelism needs all of them in each all-to-all); with the tokens and sequences it read."""
    n = cfg.eval_sequences(data.seq_len, len(data))
    per_rank = max(1, n // dims.world_size)
    idx = (np.arange(dims.rank * per_rank, (dims.rank + 1) * per_rank) % len(data)).astype(np.int64)
    total = torch.tensor(sequence_loss(model, data, idx, cfg.micro_batch_size), dtype=torch.float64)
    _all_reduce_sum(total, dims.world_size)
    return {"loss": float(total[0] / total[1]), "tokens": int(total[1]), "sequences": per_rank * dims.world_size}


@torch.no_grad()
def multiple_choice_sharded(model: torch.nn.Module, cfg: TrainConfig, dims: ParallelDims) -> dict[str, Any]:
    """Perplexity-based multiple choice over ``cfg.eval_tasks`` with the data's tokenizer, rank r scoring
    items r, r + world, ... and every rank running the same number of forwards (a rank short of items
    repeats one and drops its score: expert parallelism needs every rank in each all-to-all); the counts
    are summed over the ranks."""
    source = str(tasks_location(cfg.eval_tasks))
    tasks = load_tasks(source)
    raw = read_bytes(join_location(cfg.data_dir, TOKENIZER_NAME))
    assert raw is not None, "trainer.validate checks the data's tokenizer before any worker starts"
    tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    mine = tasks[dims.rank::dims.world_size]
    correct, chance = choice_counts(model, tokenizer, mine) if mine else (0, 0.0)
    short = -(-len(tasks) // dims.world_size) - len(mine)
    if short:
        choice_counts(model, tokenizer, tasks[:short])
    total = _all_reduce_sum(torch.tensor([correct, chance], dtype=torch.float64), dims.world_size)
    return {"tasks": source, **choice_summary(int(total[0]), float(total[1]), len(tasks))}


def _sample_hash(idx: np.ndarray, dims: ParallelDims) -> str:
    """A fingerprint of the global batch actually trained on (every rank's indices, in rank order)."""
    local = torch.from_numpy(idx.astype(np.int64))
    if dims.world_size > 1:
        parts = [torch.empty_like(local) for _ in range(dims.world_size)]
        dist.all_gather(parts, local)
        local = torch.cat(parts)
    return hashlib.sha1(local.numpy().tobytes()).hexdigest()[:16]


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the gradients held by this process's parameters."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config`` = {"train": TrainConfig dict, "run_name", "log_dir",
    and "remote_run_dir" (the run's directory on remote storage, or None)}."""
    # deferred: Ray Train (~2 s) is needed only inside a Ray worker; tests and bench/checkpoint.py import
    # this module's helpers without it
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    cfg = from_dict(TrainConfig, config["train"])
    run_name, log_dir = config["run_name"], Path(config["log_dir"])
    ctx = ray.train.get_context()
    dims = ParallelDims(world_size=ctx.get_world_size(), rank=ctx.get_world_rank(), ep=cfg.scaling.expert_parallel)
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also NaN-fills every torch.empty; DeepSpeed allocates buffers with it on every
        # step, which made fp32 CPU training 2.5x slower. Nothing reads uninitialized memory here.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined,unused-ignore]
    torch.manual_seed(cfg.seed * 1000 + dims.rank)

    manifest = read_manifest(cfg.data_dir)
    reader = {"cache_bytes": cfg.data_cache_bytes}
    train_data = TokenDataset(cfg.data_dir, "train", manifest, shuffle_window=cfg.data_shuffle_window, **reader)
    val_data = TokenDataset(cfg.data_dir, "validation", manifest, **reader) if cfg.eval_every >= 0 else None
    seq_len = manifest.seq_len
    tokenizer = _data_tokenizer(cfg, manifest.eos_token_id) if dims.rank == 0 else {}
    batch = cfg.batch_sequences(seq_len)
    per_rank = batch // dims.world_size
    grad_accum = per_rank // cfg.micro_batch_size

    # Resume from what Ray Train registered, never from a directory listing, in place on the storage path
    # (local or s3://: nothing is downloaded). Every rank reads only the byte ranges of the sharded state its
    # new partition owns (any world size, any expert-parallel size).
    state: dict[str, Any] = {"step": 0, "consumed_samples": cfg.data_start, "consumed_tokens": 0,
                             "cumulative_flops": 0.0}
    ckpt = ray.train.get_checkpoint()
    where = {"directory": ckpt.path, "filesystem": ckpt.filesystem} if ckpt is not None else None
    saved = read_trainer_state(**where) if where is not None else None
    model_cfg = model_config_of(saved) if saved is not None else cfg.model

    # The fixed order (torchtitan's parallelize_llama): groups, model, parameter groups, engine.
    ep = create_parallel_groups(dims, model_cfg)
    model = build_worker_model(cfg, model_cfg, ep, device, resuming=saved is not None)
    engine = build_engine(model, cfg, cfg.micro_batch_size, grad_accum, dims.world_size, ep)
    module = engine.module

    if where is not None and saved is not None:
        load_sharded_state(fragments=owned_state(engine, module), **where)
        load_buffers(model=module, **where)
        finish_load(engine, module, int(saved["optimizer_step"]))
        state.update({k: saved[k] for k in state})
        rng = read_rng(rank=dims.rank, same_world_size=saved.get("world_size") == dims.world_size, **where)
        if rng is not None:
            torch.set_rng_state(rng)
    start_step = int(state["step"])

    flops_per_token = model_cfg.flops_per_token(seq_len)
    peak = cfg.peak_flops_per_worker or (GPU_PEAK_FLOPS if device.type == "cuda" else CPU_PEAK_FLOPS)
    logger = None
    if dims.rank == 0:
        logger = MetricsLogger(log_dir, run_name, cfg.wandb, to_dict(cfg), start_step, cfg.steps, cfg.log_every,
                               remote=config.get("remote_run_dir"))
        print(f"[aquila-ray] {run_name}: {'resuming at step ' + str(start_step) if start_step else 'starting'} with "
              f"{dims.world_size} worker(s), global batch {batch} x {seq_len} tokens, grad accumulation "
              f"{grad_accum} x {cfg.micro_batch_size}, ZeRO stage {effective_zero_stage(cfg, dims.world_size)}",
              flush=True)

    try:
        step = start_step
        last_row: dict[str, Any] = {}
        # DeepSpeed clips but does not record the norm without ZeRO (stage 0, one worker): measure it here,
        # on the accumulated gradients before the step clips them, as ZeRO reports it
        own_grad_norm = effective_zero_stage(cfg, dims.world_size) == 0
        grad_norm: Any = None
        # a stage that starts from a checkpoint (grown, upcycled) measures where it starts, before any update:
        # the "just after the transform" point of EfficientScale's transitions, in the stage's own layout
        start_validation = validation(module, val_data, cfg, dims) \
            if val_data is not None and start_step == 0 and cfg.init != "scratch" else None
        while step < cfg.steps:
            _maybe_inject_fault(cfg, dims.rank, step + 1, log_dir)
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optimizer.lr, cfg.schedule, cfg.steps)
            set_lr(engine, lr)
            idx, rows = rank_batch(train_data, cfg.seed, int(state["consumed_samples"]), batch, dims.rank,
                                   dims.world_size)
            x = torch.from_numpy(rows).to(device)
            sums = torch.zeros(3, dtype=torch.float64)  # loss, aux, z
            routers: torch.Tensor | None = None  # (L, E + 2): tokens per expert, entropy, dropped
            for m in range(grad_accum):
                mb = x[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]
                out = engine(mb[:, :-1], labels=mb[:, 1:])
                engine.backward(out.total_loss)
                if m == grad_accum - 1 and own_grad_norm:
                    grad_norm = _grad_norm(engine.module)
                engine.step()
                sums[0] += float(out.loss.detach())
                if out.aux_loss is not None:
                    sums[1] += float(out.aux_loss.detach())
                    sums[2] += float(out.z_loss.detach())
                    r = router_telemetry(out.router_stats)
                    routers = r if routers is None else routers + r
            if not own_grad_norm:
                grad_norm = engine.get_global_grad_norm()
            packed = torch.cat([sums / grad_accum, (routers.flatten() if routers is not None
                                                    else torch.zeros(0, dtype=torch.float64))])
            _all_reduce_sum(packed, dims.world_size)
            sample_hash = _sample_hash(idx, dims)
            step += 1
            state["step"] = step
            state["consumed_samples"] += batch
            state["consumed_tokens"] += batch * seq_len
            state["cumulative_flops"] += flops_per_token * batch * seq_len
            dt = time.perf_counter() - t0
            tokens_per_s = batch * seq_len / dt
            row: dict[str, Any] = {
                "step": step, "loss": float(packed[0]) / dims.world_size, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens_per_s, "mfu": flops_per_token * tokens_per_s / (peak * dims.world_size),
                "step_time_s": dt, "consumed_tokens": int(state["consumed_tokens"]),
                "consumed_samples": int(state["consumed_samples"]),
                "cumulative_flops": float(state["cumulative_flops"]), "epoch": int(state["consumed_samples"]
                                                                                  // len(train_data)),
                "world_size": dims.world_size, "grad_accum": grad_accum, "sample_hash": sample_hash,
            }
            if routers is not None:
                row["aux_loss"] = float(packed[1]) / dims.world_size
                row["z_loss"] = float(packed[2]) / dims.world_size
                routing = packed[3:].reshape(routers.shape)  # summed over micro-batches and ranks
                row.update(router_metrics(routing, grad_accum * dims.world_size))
                balance_experts(module, routing[:, :-2])
            is_last = step == cfg.steps
            if start_validation is not None:
                row["val_loss_start"], start_validation = start_validation["loss"], None
            if val_data is not None and ((cfg.eval_every > 0 and step % cfg.eval_every == 0) or is_last):
                measured = validation(module, val_data, cfg, dims)
                row["val_loss"] = measured["loss"]
                if is_last:
                    row.update(val_tokens=measured["tokens"], val_sequences=measured["sequences"])
            if is_last and cfg.eval_tasks is not None:
                choice = multiple_choice_sharded(module, cfg, dims)
                row.update({f"mc_{k}": v for k, v in choice.items() if k != "tasks"})
            if logger is not None:
                logger.log(row)
            last_row = row
            if step % cfg.checkpoint.every == 0 or is_last:
                export = is_last or bool(cfg.checkpoint.export_every and step % cfg.checkpoint.export_every == 0)
                if logger is not None:  # the rows up to this checkpoint, to remote storage (before it registers)
                    logger.upload()
                _save_and_report(engine, module, cfg, dims, ep, state, row, batch, export, Checkpoint,
                                 ray.train.report, CheckpointUploadMode, tokenizer)
        if logger is not None and last_row:
            print(f"[aquila-ray] {run_name}: done at step {step}", flush=True)
    finally:
        if logger is not None:
            logger.close()


def _data_tokenizer(cfg: TrainConfig, eos_token_id: int | None) -> dict[str, bytes]:
    """The data set's tokenizer as Hugging Face files (``tokenizer.json`` + ``tokenizer_config.json``; a few
    MB, bounded by the vocabulary), which rank 0 puts into every checkpoint so a model carries the tokenizer
    it was trained with. Empty when the data has none (synthetic shards) or it is unusable (a warning: the
    run trains on, its checkpoints without tokenizer files)."""
    content = read_bytes(join_location(cfg.data_dir, TOKENIZER_NAME))
    if content is None:
        return {}
    try:
        return hf_tokenizer(content, cfg.model.max_seq_len, eos_token_id, f"{cfg.data_dir}/{TOKENIZER_NAME}").files
    except ConversionError as e:
        print(f"[aquila-ray] warning: checkpoints will carry no tokenizer: {e}", flush=True)
        return {}


def _save_and_report(engine: Any, module: torch.nn.Module, cfg: TrainConfig, dims: ParallelDims, ep: Any,
                     state: dict[str, Any], row: dict[str, Any], batch: int, export: bool, checkpoint_cls: Any,
                     report: Any, upload_mode: Any, tokenizer: dict[str, bytes] | None = None) -> None:
    """Every rank writes what it owns into its own directory and reports it; Ray Train merges the ranks'
    files into one checkpoint and registers it once all have uploaded (a half-written one is never seen).
    Rank 0 adds the trainer state, the data's tokenizer (``tokenizer``: the HF files' contents) and,
    when ``export``, the model checkpoint streamed one tensor at a time.
    With ``checkpoint.async_upload`` (not for the export) the upload runs in Ray Train's background thread,
    which deletes the local files after it."""
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
    tmp = Path(tempfile.mkdtemp(prefix=f"aquila-ray-ckpt-rank{dims.rank}-"))
    in_background = cfg.checkpoint.async_upload and not export
    handed_over = False
    try:
        save_sharded_state(tmp, owned_state(engine, module), state_file_index(
            module.config, dims.world_size, cfg.checkpoint.state_file_bytes))  # type: ignore[arg-type]
        save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / rng_name(dims.rank)))
        if export:
            writer = (CheckpointWriter(tmp, module.config, cfg.checkpoint.max_shard_bytes)  # type: ignore[arg-type]
                      if dims.rank == 0 else None)
            for name, tensor in iter_model_tensors(engine, module, ep):  # type: ignore[arg-type]
                if writer is not None:
                    writer.add(name, tensor)
            if writer is not None:
                writer.close()
        if dims.rank == 0:
            save_buffers(tmp, module)
            for name, content in (tokenizer or {}).items():
                (tmp / name).write_bytes(content)
            write_json(tmp / TRAINER_STATE_NAME, {
                **state, "epoch": row["epoch"], "world_size": dims.world_size, "global_batch_sequences": batch,
                "seed": cfg.seed, "data_position": int(state["consumed_samples"]),
                "optimizer_step": optimizer_step(engine), "model_config": to_dict(module.config),
                "expert_parallel": dims.ep, "zero_stage": effective_zero_stage(cfg, dims.world_size),
                "saved_at": time.time(), "metrics": metrics})
            write_json(tmp / TRAIN_CONFIG_NAME, to_dict(cfg))
        report(metrics, checkpoint=checkpoint_cls.from_directory(str(tmp)),
               checkpoint_upload_mode=upload_mode.ASYNC if in_background else upload_mode.SYNC,
               delete_local_checkpoint_after_upload=in_background)
        handed_over = in_background
    finally:
        if not handed_over:
            shutil.rmtree(tmp, ignore_errors=True)

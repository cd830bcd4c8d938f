"""Helpers for the Ray trainer tests (test_train_ray, test_train_moe): kill a training worker from outside
the process, and check inside real Ray Train workers what a resharded load of a sharded checkpoint put into
DeepSpeed's buffers. Ray ships this module to its workers by value (``register_pickle_by_value``)."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from aquila_ray.config.base import from_dict, to_dict
from aquila_ray.config.train import TrainConfig
from aquila_ray.data.shards import read_manifest
from aquila_ray.train.checkpointing import (
    WEIGHT,
    Fragment,
    iter_saved_tensors,
    load_sharded_state,
    model_config_of,
    read_trainer_state,
    state_key,
)
from aquila_ray.train.engine import (
    ParallelDims,
    _torch_optimizer,
    build_engine,
    build_worker_model,
    create_parallel_groups,
    finish_load,
    owned_state,
)
from aquila_ray.train.metrics import read_metrics


def training_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Every saved fp32 master weight and Adam moment of a checkpoint, assembled from the ranks' slices
    (toy size only)."""
    return dict(iter_saved_tensors(checkpoint))


class OutsideKill:
    """SIGKILL one Ray Train worker process (chosen at random) from outside, once rank 0 has logged
    ``after_step``: the process gets no chance to clean up, as when a node's OOM killer or a spot
    reclaim hits it. Start it before the run; ``killed_at`` is the kill's wall time."""

    def __init__(self, metrics_path: str | Path, after_step: int, seed: int, timeout_s: float = 600.0) -> None:
        self.metrics_path, self.after_step, self.timeout_s = Path(metrics_path), after_step, timeout_s
        self.rng = random.Random(seed)
        self.killed_at: float | None = None
        self.pid: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            rows = read_metrics(self.metrics_path) if self.metrics_path.is_file() else []
            if rows and rows[-1]["step"] >= self.after_step:
                workers = [p for p in psutil.process_iter(["pid", "cmdline"])
                           if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]
                if workers:
                    victim = self.rng.choice(sorted(workers, key=lambda p: p.pid))
                    os.kill(victim.pid, signal.SIGKILL)
                    self.killed_at, self.pid = time.time(), victim.pid
                    return
            time.sleep(0.02)


def _check_loaded_state(config: dict[str, Any]) -> None:
    """A Ray Train loop: build this rank's engine at the current world size, load the checkpoint's sharded
    state, and record what landed in the optimizer against the saved tensors (assembled from every saved
    slice)."""
    import ray.train

    ctx = ray.train.get_context()
    cfg = from_dict(TrainConfig, config["train"])
    directory = Path(config["checkpoint"])
    dims = ParallelDims(world_size=ctx.get_world_size(), rank=ctx.get_world_rank(), ep=cfg.scaling.expert_parallel)
    saved = read_trainer_state(directory)
    model_cfg = model_config_of(saved)
    ep = create_parallel_groups(dims, model_cfg)
    model = build_worker_model(cfg, model_cfg, ep, torch.device("cpu"), resuming=True)
    batch = cfg.batch_sequences(read_manifest(cfg.data_dir).seq_len)
    engine = build_engine(model, cfg, cfg.micro_batch_size, batch // dims.world_size // cfg.micro_batch_size,
                          dims.world_size, ep)
    fragments = owned_state(engine, engine.module)
    load_sharded_state(directory, fragments)
    finish_load(engine, engine.module, int(saved["optimizer_step"]))
    weight_keys = {state_key(WEIGHT, name) for name, _ in engine.module.named_parameters()}
    full = dict(iter_saved_tensors(directory, sorted(set(fragments) | weight_keys)))
    mismatched = []
    for key, f in fragments.items():
        assert isinstance(f, Fragment)
        expected = full[key][f.start:f.start + f.local_tensor.numel()]
        if not torch.equal(f.local_tensor, expected):
            mismatched.append(key)
    weights_mismatched = [name for name, p in engine.module.named_parameters()
                          if not torch.equal(p.detach().reshape(-1), full[state_key(WEIGHT, name)])]
    record = {"rank": dims.rank, "keys": len(fragments), "mismatched": mismatched,
              "weights_mismatched": weights_mismatched,
              "elements": sum(f.local_tensor.numel() for f in fragments.values()),  # type: ignore[attr-defined]
              "optimizer_steps": sorted({float(st["step"]) for st in _torch_optimizer(engine).state.values()})}
    (Path(config["out"]) / f"rank{dims.rank}.json").write_text(json.dumps(record))


def check_resharded_load(cfg: TrainConfig, checkpoint: str, workers: int, out: Path, storage: Path,
                         name: str) -> list[dict[str, Any]]:
    """Run ``_check_loaded_state`` on ``workers`` Ray Train workers; one record per rank."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out.mkdir(parents=True, exist_ok=True)
    TorchTrainer(_check_loaded_state, torch_config=TorchConfig(backend="cpu:gloo"),
                 train_loop_config={"train": to_dict(cfg), "checkpoint": checkpoint, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=name, storage_path=str(storage))).fit()  # type: ignore[call-arg]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]


def add_choice_tasks(data_dir: Path, items: int = 5) -> Path:
    """Give synthetic shards a small real BPE tokenizer (``tokenizer.json``, 200 tokens: ids within any test
    model's vocabulary) and a multiple-choice file of the bundled task's first ``items`` items (an odd count,
    so two ranks get unequal shares); returns the task file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from aquila_ray.eval import SAMPLE_TASKS

    lines = SAMPLE_TASKS.read_text(encoding="utf-8").splitlines()[:items]
    text = [f"{t['question']} {' '.join(t['choices'])}" for t in map(json.loads, lines)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(data_dir / "tokenizer.json"))
    tasks = data_dir / "tasks.jsonl"
    tasks.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tasks

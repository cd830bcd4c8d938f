"""Training checkpoints: the model checkpoint format plus optimizer state, trainer state and RNG.

A training checkpoint directory is a model checkpoint (``aquila_ray.checkpoint``: ``config.json``,
safetensors weights and index, so ``aquila_ray.load_model`` opens it directly) with, beside it:

- ``optimizer.safetensors``: full fp32 Adam moments per parameter name (``NAME.exp_avg``, ``NAME.exp_avg_sq``),
  the optimizer step in its metadata; layout-independent like the weights;
- ``trainer_state.json``: step, consumed samples and tokens (the data position), epoch, cumulative FLOPs,
  world size and global batch at save time, seed, last metrics;
- ``rng.safetensors``: every rank's torch RNG state as uint8 tensors (restored when the world size matches);
- ``train_config.json``: the TrainConfig of the run that wrote it.

Rank 0 writes it under a temporary name and renames it (``save_checkpoint`` is atomic), then registers it
with ``ray.train.report``; a resume reads only what Ray Train registered (``ray.train.get_checkpoint()``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from aquila_ray.checkpoint import load_state_dict, save_checkpoint
from aquila_ray.config.model import ModelConfig
from aquila_ray.errors import CheckpointError

OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
RNG_NAME = "rng.safetensors"
TRAIN_CONFIG_NAME = "train_config.json"


@dataclass
class TrainingCheckpoint:
    model_state: dict[str, torch.Tensor]
    model_config: ModelConfig
    optimizer_state: dict[str, torch.Tensor]
    optimizer_step: int
    trainer_state: dict[str, Any]
    rng: dict[str, torch.Tensor]


def write_training_checkpoint(directory: str | Path, model_state: dict[str, torch.Tensor], model_config: ModelConfig,
                              optimizer_state: dict[str, torch.Tensor], optimizer_step: int,
                              trainer_state: dict[str, Any], rng: dict[str, torch.Tensor],
                              train_config: dict[str, Any], max_shard_bytes: int) -> Path:
    extra: dict[str, str | bytes] = {
        OPTIMIZER_NAME: save_bytes({k: v.contiguous() for k, v in optimizer_state.items()},
                                   metadata={"step": str(optimizer_step), "format": "aquila-ray-adamw/1"}),
        TRAINER_STATE_NAME: json.dumps(trainer_state, indent=2),
        RNG_NAME: save_bytes(rng),
        TRAIN_CONFIG_NAME: json.dumps(train_config, indent=2, default=str),
    }
    return save_checkpoint(directory, model_state, model_config, max_shard_bytes=max_shard_bytes, extra_files=extra)


def read_training_checkpoint(directory: str | Path) -> TrainingCheckpoint:
    d = Path(directory)
    for name in (OPTIMIZER_NAME, TRAINER_STATE_NAME):
        if not (d / name).is_file():
            raise CheckpointError(f"{d} has no {name}: a model checkpoint, not a training checkpoint; start a "
                                  f"new run from it with init=checkpoint, init_from={d}")
    model_state, model_config = load_state_dict(d)
    from safetensors import safe_open

    with safe_open(str(d / OPTIMIZER_NAME), framework="pt") as f:
        step = int((f.metadata() or {}).get("step", "0"))
    optimizer_state = load_file(str(d / OPTIMIZER_NAME))
    rng = load_file(str(d / RNG_NAME)) if (d / RNG_NAME).is_file() else {}
    trainer_state = json.loads((d / TRAINER_STATE_NAME).read_text())
    return TrainingCheckpoint(model_state, model_config, optimizer_state, step, trainer_state, rng)

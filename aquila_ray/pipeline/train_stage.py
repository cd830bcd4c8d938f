"""One training stage, as the pipeline and the stage-by-stage benchmarks run it: a Ray Train run, then its
final model exported (the model part of the checkpoint, no optimizer state) and its metric rows read back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from aquila_ray.checkpoint import atomic_directory, load_config
from aquila_ray.config.train import TrainConfig
from aquila_ray.errors import ConfigError
from aquila_ray.train.metrics import read_run_metrics

# what a stage's exported model keeps of Ray Train's checkpoint (no optimizer state: the next stage starts fresh)
_KEEP = ("config.json", "model.safetensors.index.json", "trainer_state.json")
_KEEP_IF_PRESENT = ("tokenizer.json", "tokenizer_config.json")  # the data's tokenizer (real data sets have one)


def export_model(checkpoint: Any, dst: Path) -> Path:
    """Copy the model part of a Ray Train checkpoint (local or on object storage) into ``dst``, atomically."""
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


__all__ = ["TrainedStage", "data_position", "export_model", "train_stage"]

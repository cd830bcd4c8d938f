"""Per-step metrics on rank 0: a local ``metrics.jsonl``, readable console lines, and W&B.

W&B is initialised by rank 0 itself (Ray Train V2 takes no Tune logger callbacks and ``setup_wandb`` does
not filter ranks): a stable run id derived from the run name, ``resume="allow"``, an explicit ``dir`` in
the run directory, and offline mode unless WANDB_MODE or WANDB_API_KEY says otherwise. ``read_wandb_history``
reads an offline run file back (a LevelDB-log of protobuf ``Record``s) without a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from aquila_ray.config.train import WandbConfig
from aquila_ray.data.shards import resolve_location
from aquila_ray.errors import DataError
from aquila_ray.model.model import RouterStats

log = logging.getLogger("aquila_ray.train")

METRICS_NAME = "metrics.jsonl"
METRICS_PARTS = "metrics"
"""Where rank 0 uploads its rows under a remote run directory (one file per checkpoint interval)."""


def wandb_run_id(run_name: str) -> str:
    """A stable W&B id for a run name: reruns with the same name resume the same W&B run."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_name)[:40]
    return f"{safe}-{hashlib.sha1(run_name.encode()).hexdigest()[:8]}"


def wandb_mode(cfg: WandbConfig) -> str:
    if not cfg.enabled:
        return "disabled"
    if cfg.mode is not None:
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def router_telemetry(stats: list[RouterStats]) -> torch.Tensor:
    """One micro-batch's routing, (L, E + 2) float64 on the CPU: per layer the assignments each expert
    received, the router entropy, and the assignments dropped. Sums over micro-batches and ranks."""
    rows = [torch.cat([s.tokens_per_expert.detach().double(), s.entropy.detach().double().reshape(1),
                       s.dropped_tokens.detach().double().reshape(1)]) for s in stats]
    return torch.stack(rows).cpu()  # one copy off the device


def router_metrics(summed: torch.Tensor, micro_batches: int) -> dict[str, Any]:
    """Step metrics from ``router_telemetry`` summed over ``micro_batches`` micro-batches (all ranks):
    per layer the load imbalance (max / mean assignments), the mean router entropy (nats) and each
    expert's assignments; overall the worst imbalance and the dropped assignments."""
    row: dict[str, Any] = {}
    imbalance = []
    for layer, values in enumerate(summed.tolist()):
        counts, entropy = values[:-2], values[-2]
        mean = sum(counts) / len(counts)
        imbalance.append(max(counts) / mean if mean > 0 else 0.0)
        row[f"moe/layer{layer}/imbalance"] = imbalance[-1]
        row[f"moe/layer{layer}/router_entropy"] = entropy / micro_batches
        for e, c in enumerate(counts):
            row[f"moe/layer{layer}/expert{e}_tokens"] = int(c)
    row["moe/max_imbalance"] = max(imbalance)
    row["moe/dropped_assignments"] = int(summed[:, -1].sum())
    return row


def format_console(row: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {row['step']}/{total_steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"gnorm {row['grad_norm']:.3f}", f"{row['tokens_per_s']:,.0f} tok/s", f"mfu {100 * row['mfu']:.2f}%",
             f"tokens {row['consumed_tokens']:,}"]
    if "aux_loss" in row:
        parts.append(f"aux {row['aux_loss']:.4f} z {row['z_loss']:.4f} imb {row.get('moe/max_imbalance', 0):.2f}")
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4f}")
    return " | ".join(parts)


class MetricsLogger:
    """Rank 0's sink for step rows. On resume, rows after the resumed step are dropped from metrics.jsonl
    so the file always reads as one continuous curve.

    With a remote storage path (``remote``: the run's directory there, e.g. ``s3://bucket/runs/name``) the
    local file lives on rank 0's node, which the driver cannot read; ``upload`` (called with every
    checkpoint) then writes the rows since the last upload to ``remote/metrics/steps-FIRST-LAST.jsonl``
    through pyarrow's filesystem, and ``close`` copies the W&B directory to ``remote/wandb``.
    ``read_run_metrics`` reads either layout back."""

    def __init__(self, log_dir: Path, run_name: str, wandb_cfg: WandbConfig, config: dict[str, Any],
                 resume_step: int, total_steps: int, log_every: int, remote: str | None = None) -> None:
        self.path = log_dir / METRICS_NAME
        self.log_dir, self.remote = log_dir, remote
        self._pending: list[str] = []  # rows logged since the last upload (one checkpoint interval)
        self.total_steps, self.log_every = total_steps, log_every
        log_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.run: Any = None
        mode = wandb_mode(wandb_cfg)
        if mode != "disabled":
            import wandb  # deferred: wandb (~0.5 s) only when W&B is on; the trainer's driver imports this module

            self.run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, group=wandb_cfg.group,
                                  name=run_name, id=wandb_run_id(run_name), resume="allow", dir=str(log_dir),
                                  mode=mode, config=config,  # type: ignore[arg-type]
                                  settings=wandb.Settings(console="off"))  # console lines are ours already
            self.run.define_metric("*", step_metric="step")

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        row = {"time": time.time(), **row}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        line = json.dumps(clean) + "\n"
        self._file.write(line)
        self._file.flush()
        if self.remote is not None:
            self._pending.append(line)
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "time"})
        if row["step"] % self.log_every == 0 or row["step"] == self.total_steps:
            print(format_console(row, self.total_steps), flush=True)

    def upload(self) -> None:
        """Write the rows logged since the last upload to the remote run directory (a no-op without one)."""
        if self.remote is None or not self._pending:
            return
        first, last = (json.loads(self._pending[i])["step"] for i in (0, -1))
        fs, base = resolve_location(self.remote)
        fs.create_dir(f"{base}/{METRICS_PARTS}", recursive=True)
        with fs.open_output_stream(f"{base}/{METRICS_PARTS}/steps-{first:09d}-{last:09d}.jsonl") as out:
            out.write("".join(self._pending).encode("utf-8"))
        self._pending = []

    def close(self) -> None:
        self._file.close()
        self.upload()
        if self.run is not None:
            self.run.finish()
            self.run = None
        local_wandb = self.log_dir / "wandb"
        if self.remote is not None and local_wandb.is_dir():
            fs, base = resolve_location(self.remote)
            for entry in sorted(local_wandb.iterdir()):  # the run directories, not W&B's latest-run symlink
                if not entry.is_symlink():
                    pafs.copy_files(str(entry), f"{base}/wandb/{entry.name}",
                                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def read_run_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The metric rows of a run directory, local (``metrics.jsonl``) or on remote storage (the
    ``metrics/`` parts rank 0 uploads with every checkpoint; a step in two parts, redone after a resume,
    keeps the row of the part written last)."""
    if "://" not in str(run_dir) and (Path(run_dir) / METRICS_NAME).is_file():
        return read_metrics(Path(run_dir) / METRICS_NAME)
    fs, base = resolve_location(run_dir)
    listing = fs.get_file_info(pafs.FileSelector(f"{base}/{METRICS_PARTS}", allow_not_found=True))
    by_step: dict[int, dict[str, Any]] = {}
    parts = [i for i in listing if i.is_file and i.base_name.endswith(".jsonl")]
    for info in sorted(parts, key=lambda i: (i.mtime_ns or 0, i.path)):  # written later wins
        with fs.open_input_stream(info.path) as f:
            for line in f.read().decode("utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    by_step[int(row["step"])] = row
    return [by_step[k] for k in sorted(by_step)]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file ([] when there is none yet). A last line that does not parse is a
    write torn by a crash and is left out; a bad line before it is an error."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise DataError(f"{p}: line {i + 1} is not JSON ({e}); only the last line may be torn") from e
    return rows


def _leveldb_records(data: bytes) -> list[bytes]:
    block, pos, out, buf = 32768, 7, [], b""  # 7-byte file header ":W&B" + magic + version
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk = data[pos:pos + length]
        pos += length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
            buf = b""
    return out


def read_wandb_history(run_file: str | Path) -> list[dict[str, Any]]:
    """History rows of a W&B run file (``.../offline-run-*/run-<id>.wandb``), read without a server."""
    from wandb.proto import wandb_internal_pb2 as pb  # deferred: wandb (~0.5 s), only to read a run file back

    rows = []
    for raw in _leveldb_records(Path(run_file).read_bytes()):
        rec = pb.Record()  # type: ignore[attr-defined]
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
    return rows


def wandb_run_files(log_dir: str | Path) -> list[Path]:
    """Every W&B run file under a run's log directory, oldest first (one per (re)start)."""
    return sorted(Path(log_dir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)

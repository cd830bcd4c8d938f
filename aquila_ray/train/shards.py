"""The token shard format (DESIGN.md "Token shards"): written by data_pipeline, read by the trainer.

A prepared data directory holds ``manifest.json`` and ``tokens/{train,validation}/*.arrow``. Each shard is
an Arrow IPC *file* (random access, memory-mappable) with one column ``tokens`` of type
``fixed_size_list<uint32>[seq_len + 1]``: a packed training sequence plus the next token, so inputs are
``row[:-1]`` and targets ``row[1:]``. Sequence counts, token counts and the tokenizer hash are in the
manifest; paths in it are relative to the manifest's directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from aquila_ray.errors import DataError

FORMAT = "aquila-ray-tokens/1"
COLUMN = "tokens"
SPLITS = ("train", "validation")


def shard_schema(seq_len: int) -> pa.Schema:
    return pa.schema([pa.field(COLUMN, pa.list_(pa.uint32(), seq_len + 1))])


def write_token_shard(path: str | Path, sequences: np.ndarray) -> int:
    """Write an (N, seq_len + 1) integer array as one shard, atomically (temp name + rename).

    Returns N. Token ids must fit uint32.
    """
    seqs = np.asarray(sequences)
    if seqs.ndim != 2 or seqs.shape[1] < 2:
        raise DataError(f"token shard {path}: expected an (N, seq_len + 1) array, got shape {seqs.shape}")
    if seqs.size and (seqs.min() < 0 or seqs.max() > np.iinfo(np.uint32).max):
        raise DataError(f"token shard {path}: token ids must lie in [0, 2**32), got [{seqs.min()}, {seqs.max()}]")
    width = seqs.shape[1]
    flat = pa.array(seqs.astype(np.uint32, copy=False).reshape(-1), type=pa.uint32())
    column = pa.FixedSizeListArray.from_arrays(flat, width)
    table = pa.Table.from_arrays([column], schema=shard_schema(width - 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=8192)
    os.replace(tmp, path)
    return int(seqs.shape[0])


def read_token_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard and return a read-only (N, seq_len + 1) uint32 view (no copy)."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"token shard {path} cannot be opened as an Arrow IPC file: {e}") from e
    table = reader.read_all()
    if table.schema.names != [COLUMN] or not pa.types.is_fixed_size_list(table.schema.field(COLUMN).type):
        raise DataError(f"token shard {path} has schema {table.schema}; expected one fixed-size list column "
                        f"{COLUMN!r} of uint32")
    width = table.schema.field(COLUMN).type.list_size
    col = table.column(COLUMN).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=True)
    return values.reshape(-1, width)


@dataclass
class ShardInfo:
    path: str
    """Relative to the manifest's directory."""
    num_sequences: int


@dataclass
class SplitInfo:
    files: list[ShardInfo] = field(default_factory=list)

    @property
    def num_sequences(self) -> int:
        return sum(f.num_sequences for f in self.files)


@dataclass
class Manifest:
    """What ``manifest.json`` holds. ``num_tokens`` counts trained tokens: sequences * seq_len."""

    seq_len: int
    vocab_size: int
    tokenizer_sha256: str
    splits: dict[str, SplitInfo]
    eos_token_id: int | None = None
    sources: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path = Path(".")

    def num_tokens(self, split: str = "train") -> int:
        return self.splits[split].num_sequences * self.seq_len

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / f.path for f in self.splits[split].files]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "seq_len": self.seq_len,
            "dtype": "uint32",
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256,
            "eos_token_id": self.eos_token_id,
            "splits": {
                name: {
                    "num_sequences": s.num_sequences,
                    "num_tokens": s.num_sequences * self.seq_len,
                    "files": [{"path": f.path, "num_sequences": f.num_sequences} for f in s.files],
                }
                for name, s in self.splits.items()
            },
            "sources": self.sources,
            **({"extra": self.extra} if self.extra else {}),
        }


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / "manifest.json"
    tmp = path.with_name(f"manifest.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path) -> Manifest:
    """Load and check ``DIR/manifest.json``: every listed shard must exist."""
    root = Path(directory)
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"no manifest.json in {str(root)!r}; prepare data first: "
                        f"python -m jobs.prepare_data --output {root}")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT:
        raise DataError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
    splits = {
        name: SplitInfo([ShardInfo(f["path"], int(f["num_sequences"])) for f in s["files"]])
        for name, s in raw["splits"].items()
    }
    missing = [str(root / f.path) for s in splits.values() for f in s.files if not (root / f.path).is_file()]
    if missing:
        raise DataError(f"{path} lists {len(missing)} shard(s) that do not exist, e.g. {missing[:3]}")
    return Manifest(seq_len=int(raw["seq_len"]), vocab_size=int(raw["vocab_size"]),
                    tokenizer_sha256=raw.get("tokenizer_sha256", ""), splits=splits,
                    eos_token_id=raw.get("eos_token_id"), sources=raw.get("sources", {}),
                    extra=raw.get("extra", {}), root=root)

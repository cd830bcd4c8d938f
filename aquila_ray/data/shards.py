"""The token shard format (DESIGN.md "Token shards"): written by data_pipeline, read by the trainer.

A prepared data directory holds ``manifest.json`` and ``tokens/{train,validation}/*.arrow``. Each shard is
an Arrow IPC *file* (random access, memory-mappable) with one column ``tokens`` of type
``fixed_size_list<uint32>[seq_len + 1]``: a packed training sequence plus the next token, so inputs are
``row[:-1]`` and targets ``row[1:]``, in record batches of ``BATCH_ROWS`` rows. Sequence counts, token
counts and the tokenizer hash are in the manifest; paths in it are relative to the manifest's directory.

Reading (``ShardReader``, ``read_manifest``) goes through pyarrow filesystems: a local path or ``file://``
is memory-mapped one record batch at a time; ``s3://``, ``gs://`` and other URIs
(``pyarrow.fs.FileSystem.from_uri``) are opened for random access and only the record batches asked for are
fetched. Writing (``write_token_shard``, ``write_manifest``) goes through the same filesystems: a file is
written under a temp name and moved into place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from aquila_ray.errors import DataError

FORMAT = "aquila-ray-tokens/1"
COLUMN = "tokens"
SPLITS = ("train", "validation")
BATCH_ROWS = 8192
"""Rows per record batch that ``write_token_shard`` writes (the unit a reader maps or fetches)."""
BATCH_ROWS_KEY = b"aquila_ray.batch_rows"
"""Schema metadata: the rows of each record batch, comma-separated, so a remote reader needs only the footer."""


def shard_schema(seq_len: int) -> pa.Schema:
    return pa.schema([pa.field(COLUMN, pa.list_(pa.uint32(), seq_len + 1))])


def write_token_shard(path: str | Path, sequences: np.ndarray, filesystem: pafs.FileSystem | None = None) -> int:
    """Write an (N, seq_len + 1) integer array as one shard, atomically (temp name + move) at a local path, a
    URI, or a path inside ``filesystem``.

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
    batch_rows = [min(BATCH_ROWS, len(seqs) - start) for start in range(0, len(seqs), BATCH_ROWS)]
    schema = shard_schema(width - 1).with_metadata({BATCH_ROWS_KEY: ",".join(map(str, batch_rows))})
    table = pa.Table.from_arrays([column], schema=schema)
    with atomic_output(path, filesystem) as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=BATCH_ROWS)
    return int(seqs.shape[0])


@contextmanager
def atomic_output(location: str | Path, filesystem: pafs.FileSystem | None) -> Iterator[pa.NativeFile]:
    """An output stream whose bytes appear at ``location`` only when the block ends without an error: written
    under a temp name, then ``FileSystem.move`` (a rename on a local disk; on an object store the final
    object is created whole by the copy behind the move)."""
    fs, target = resolve_location(location, filesystem)
    parent = posixpath.dirname(target)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp, compression=None) as sink:  # bytes as given, whatever the name
            yield sink
        fs.move(tmp, target)
    except BaseException:
        if fs.get_file_info(tmp).type == pafs.FileType.File:
            fs.delete_file(tmp)
        raise


def read_token_shard(path: str | Path, filesystem: pafs.FileSystem | None = None) -> np.ndarray:
    """A whole shard as a read-only (N, seq_len + 1) uint32 array, for tests and tools.

    A shard of one record batch comes back as a zero-copy view of the memory-mapped file; a shard of several
    is copied into one array (record batches are not contiguous in the file). The trainer never calls this:
    it reads single record batches through ``ShardReader`` under a memory cap (``data.dataset.TokenDataset``).
    """
    reader = ShardReader(path, filesystem)
    if reader.num_batches == 1:
        return reader.batch(0)
    return reader.rows(0, reader.num_rows)


def resolve_location(location: str | Path,
                     filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path, a URI (``s3://``, ``gs://``, ``file://``, ``hdfs://``:
    ``pyarrow.fs.FileSystem.from_uri``), or, when ``filesystem`` is given, a path inside that filesystem."""
    if filesystem is not None:
        return filesystem, str(location)
    text = str(location)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise DataError(f"{text!r}: pyarrow has no filesystem for this URI ({e}); valid: a local path or a "
                        f"file://, s3://, gs:// or hdfs:// URI") from e


def read_bytes(location: str | Path, filesystem: pafs.FileSystem | None = None) -> bytes | None:
    """A small file's bytes (a manifest, a tokenizer, a task file, a checkpoint's trainer state) from a local
    path, a URI or a path inside ``filesystem``; None when there is no such file."""
    fs, path = resolve_location(location, filesystem)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def join_location(root: str | Path, relative: str) -> str | Path:
    """``root/relative`` for a local Path, a path inside a filesystem, or a URI (its ``?query`` kept last)."""
    if isinstance(root, Path):
        return root / relative
    base, sep, query = root.partition("?") if "://" in root else (root, "", "")
    stem = base.rstrip("/")
    return f"{stem}/{relative}{sep}{query}" if stem or base.startswith("/") else relative


def _display(fs: pafs.FileSystem, path: str) -> str:
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


class ShardReader:
    """One token shard, read by record batch: what the trainer uses instead of ``read_token_shard``.

    Opening reads the IPC footer and learns the rows of each record batch (``batch_offsets``); ``batch(i)``
    returns a read-only (rows, seq_len + 1) uint32 array of batch ``i`` and reads nothing else:

    - a local file (plain path, ``file://``): opening walks the batches zero-copy over a memory map (metadata
      pages only) and records where each batch's token values lie in the file; ``batch`` maps the file again
      and returns a view of that byte range, so the array holds the mapping that backs it and releasing the
      array unmaps it. A process's resident memory follows the batches it keeps, not the shards it has
      touched (one long-lived mapping would keep every page ever read resident). Shards are immutable: a
      file rewritten in place after opening is not noticed;
    - any other pyarrow filesystem (``s3://``, ``gs://``, ...): opened with ``open_input_file`` (random
      access), and ``batch`` fetches that record batch only. Shards written by ``write_token_shard`` carry
      their batch sizes in the schema metadata, so opening one reads the footer only; for a shard without
      them the sizes are learnt by reading every batch once. ``close`` drops the handle (``batch`` reopens).
    """

    def __init__(self, path: str | Path, filesystem: pafs.FileSystem | None = None) -> None:
        self._fs, self._path = resolve_location(path, filesystem)
        self.location = _display(self._fs, self._path)
        self.memory_mapped = isinstance(self._fs, pafs.LocalFileSystem)
        source, reader = self._open()
        schema = reader.schema
        field_type = schema.field(COLUMN).type if schema.names == [COLUMN] else None
        if (field_type is None or not pa.types.is_fixed_size_list(field_type)
                or field_type.value_type != pa.uint32()):
            fields = ", ".join(f"{f.name}: {f.type}" for f in schema)
            raise DataError(f"token shard {self.location} has schema ({fields}); expected one fixed-size list "
                            f"column {COLUMN!r} of uint32 (written by aquila_ray.data.shards.write_token_shard)")
        self.width = int(field_type.list_size)
        self._value_starts: list[int] | None = None
        """Local files: the byte offset in the file of each batch's first token."""
        self._reader: pa.ipc.RecordBatchFileReader | None = None
        if isinstance(source, pa.MemoryMappedFile):
            rows, self._value_starts = self._scan_mapped(source, reader)
        else:
            listed = _batch_rows_from_metadata(schema, reader.num_record_batches)
            rows = listed if listed is not None else [reader.get_batch(i).num_rows
                                                      for i in range(reader.num_record_batches)]
            self._reader = reader
        self.batch_offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)
        """Batch ``i`` holds the shard's rows ``[batch_offsets[i], batch_offsets[i + 1])``."""

    @property
    def num_rows(self) -> int:
        return int(self.batch_offsets[-1])

    @property
    def num_batches(self) -> int:
        return len(self.batch_offsets) - 1

    def _open(self) -> tuple[pa.NativeFile, pa.ipc.RecordBatchFileReader]:
        try:
            source = (pa.memory_map(self._path, "r") if self.memory_mapped
                      else self._fs.open_input_file(self._path))
            return source, pa.ipc.open_file(source)
        except FileNotFoundError as e:
            raise DataError(f"token shard {self.location} does not exist; prepare the data again with "
                            f"python -m jobs.prepare_data") from e
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"token shard {self.location} cannot be opened as an Arrow IPC file: {e}") from e

    def _checked(self, column: pa.FixedSizeListArray, i: int) -> np.ndarray:
        """A record batch's tokens as a flat zero-copy uint32 array, refusing nulls."""
        values = column.flatten()
        if column.null_count or values.null_count:
            raise DataError(f"token shard {self.location}: record batch {i} has null rows or tokens; token shards "
                            f"hold none")
        return values.to_numpy(zero_copy_only=True)

    def _scan_mapped(self, source: pa.MemoryMappedFile,
                     reader: pa.ipc.RecordBatchFileReader) -> tuple[list[int], list[int] | None]:
        """Rows of every batch and where its tokens start in the file (None when a batch is not stored
        plainly, e.g. compressed, so its tokens are not in the mapping: then ``batch`` decodes it)."""
        size = source.size()
        source.seek(0)
        base = source.read_buffer(1).address  # zero-copy: the mapping's first byte
        rows, starts = [], []
        for i in range(reader.num_record_batches):
            values = self._checked(reader.get_batch(i).column(0), i)
            rows.append(values.size // self.width)
            starts.append(values.__array_interface__["data"][0] - base)
        plain = all(0 <= s and s + r * self.width * 4 <= size for s, r in zip(starts, rows, strict=True))
        return rows, starts if plain else None

    def batch_index(self, rows: np.ndarray) -> np.ndarray:
        """The record batch holding each of the shard's ``rows``."""
        return np.searchsorted(self.batch_offsets, rows, side="right") - 1

    def batch(self, i: int) -> np.ndarray:
        """Record batch ``i`` as a read-only (rows, seq_len + 1) uint32 array (zero-copy over its own mapping,
        or over the bytes fetched)."""
        if not 0 <= i < self.num_batches:
            raise DataError(f"token shard {self.location}: record batch {i} outside [0, {self.num_batches})")
        num_rows = int(self.batch_offsets[i + 1] - self.batch_offsets[i])
        if self._value_starts is not None:
            try:
                mapped = pa.memory_map(self._path, "r")
            except FileNotFoundError as e:
                raise DataError(f"token shard {self.location} does not exist any more; it was there when opened") from e
            mapped.seek(self._value_starts[i])
            buf = mapped.read_buffer(num_rows * self.width * 4)  # zero-copy: a slice of the mapping
            return np.frombuffer(buf, dtype=np.uint32).reshape(num_rows, self.width)
        if self._reader is None:  # a closed remote shard, or a local one whose batches are not stored plainly
            reader = self._open()[1]
            self._reader = None if self.memory_mapped else reader
        else:
            reader = self._reader
        values = self._checked(reader.get_batch(i).column(0), i)
        if values.size != num_rows * self.width:
            raise DataError(f"token shard {self.location}: record batch {i} holds {values.size // self.width} rows, "
                            f"its metadata says {num_rows}; the file was changed after it was written")
        return values.reshape(num_rows, self.width)

    def close(self) -> None:
        """Drop the open file handle of a non-local shard (the batch layout stays; ``batch`` reopens)."""
        self._reader = None

    def rows(self, start: int, stop: int) -> np.ndarray:
        """A copy of rows ``[start, stop)``, reading only the record batches that hold them."""
        if not 0 <= start <= stop <= self.num_rows:
            raise DataError(f"token shard {self.location}: rows [{start}, {stop}) outside [0, {self.num_rows})")
        out = np.empty((stop - start, self.width), dtype=np.uint32)
        if stop == start:
            return out
        first, last = self.batch_index(np.array([start, stop - 1]))
        for b in range(int(first), int(last) + 1):
            lo, hi = max(start, int(self.batch_offsets[b])), min(stop, int(self.batch_offsets[b + 1]))
            batch = self.batch(b)
            out[lo - start:hi - start] = batch[lo - self.batch_offsets[b]:hi - self.batch_offsets[b]]
            del batch
        return out


def _batch_rows_from_metadata(schema: pa.Schema, num_batches: int) -> list[int] | None:
    raw = (schema.metadata or {}).get(BATCH_ROWS_KEY)
    if raw is None:
        return None
    rows = [int(r) for r in raw.decode().split(",") if r]
    return rows if len(rows) == num_batches else None


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
    root: Path | str = Path(".")
    """The manifest's directory: a local Path, a URI string (``s3://bucket/data``), or a path inside the
    filesystem ``read_manifest`` was given."""

    def num_tokens(self, split: str = "train") -> int:
        return self.splits[split].num_sequences * self.seq_len

    def shard_paths(self, split: str) -> list[Path | str]:
        """Locations of the split's shards: Paths for a local manifest, URIs (or paths inside its filesystem)
        otherwise; each readable with ``read_token_shard`` / ``ShardReader``."""
        return [join_location(self.root, f.path) for f in self.splits[split].files]

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


def write_manifest(directory: str | Path, manifest: Manifest, filesystem: pafs.FileSystem | None = None) -> str:
    """Write ``directory/manifest.json`` atomically (local path, URI, or a path inside ``filesystem``)."""
    fs, base = resolve_location(directory, filesystem)
    target = str(join_location(base, "manifest.json"))
    with atomic_output(target, fs) as sink:
        sink.write(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False).encode("utf-8"))
    return target


def read_manifest(directory: str | Path, filesystem: pafs.FileSystem | None = None) -> Manifest:
    """Load and check ``DIR/manifest.json``: every listed shard must exist.

    ``directory`` is a local path, a URI (``s3://bucket/data``, ``gs://...``, ``file://...``), or a path inside
    ``filesystem``. Shards are checked by listing their directories (one listing per directory, not one
    request per shard).
    """
    local = filesystem is None and "://" not in str(directory)
    root: Path | str = Path(directory) if local else str(directory)
    fs, base = resolve_location(directory, filesystem)
    path = join_location(root, "manifest.json")
    if fs.get_file_info(str(join_location(base, "manifest.json"))).type != pafs.FileType.File:
        raise DataError(f"no manifest.json in {str(root)!r}; prepare data first: "
                        f"python -m jobs.prepare_data --output {root}")
    with fs.open_input_stream(str(join_location(base, "manifest.json"))) as f:
        raw = json.loads(f.read())
    if raw.get("format") != FORMAT:
        raise DataError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
    splits = {
        name: SplitInfo([ShardInfo(f["path"], int(f["num_sequences"])) for f in s["files"]])
        for name, s in raw["splits"].items()
    }
    listed = [f.path for s in splits.values() for f in s.files]
    missing = _missing_files(fs, base, listed)
    if missing:
        shown = [str(join_location(root, m)) for m in missing[:3]]
        raise DataError(f"{path} lists {len(missing)} shard(s) that do not exist, e.g. {shown}")
    return Manifest(seq_len=int(raw["seq_len"]), vocab_size=int(raw["vocab_size"]),
                    tokenizer_sha256=raw.get("tokenizer_sha256", ""), splits=splits,
                    eos_token_id=raw.get("eos_token_id"), sources=raw.get("sources", {}),
                    extra=raw.get("extra", {}), root=root)


def _missing_files(fs: pafs.FileSystem, base: str, relative: list[str]) -> list[str]:
    """The ``relative`` paths (under ``base``) that are not files, from one listing per parent directory."""
    wanted = {rel: posixpath.normpath(str(join_location(base, rel))) for rel in relative}
    present: set[str] = set()
    for parent in sorted({posixpath.dirname(p) for p in wanted.values()}):
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        present.update(posixpath.normpath(i.path) for i in infos if i.type == pafs.FileType.File)
    return [rel for rel, full in wanted.items() if full not in present]

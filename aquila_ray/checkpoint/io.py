"""Reading and writing checkpoint directories (see the package docstring for the format)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aquila_ray.config import ModelConfig, from_dict, to_dict
from aquila_ray.errors import CheckpointError, ConfigError
from aquila_ray.model import Aquila3

FORMAT = "aquila-ray/2"
"""Index format. /2 records each shard's BLAKE3 digest; /1 (before 2026-12) recorded SHA-256, still checked."""
CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_SHARD_BYTES = 2 * 1024**3


DIGEST = "blake3"
"""The digest the writer records per shard. BLAKE3 runs ~2x faster than SHA-256 (SHA-NI) on one core and
spreads one file over all cores: checkpoints are hashed on every save and verified on every load, and
SHA-256 was about a sixth of a growth's CPU time in profiles (docs/growth.md, "Benchmark")."""
DIGESTS = {"blake3": "BLAKE3", "sha256": "SHA-256"}
"""Digests the reader checks (index key -> name in messages); "sha256" is what format aquila-ray/1 wrote."""
ALL_CORES = blake3.blake3.AUTO


def _hasher(algo: str, threads: int = 1) -> Any:
    """A fresh hasher for ``algo``; ``threads`` > 1 (or ALL_CORES) lets BLAKE3 hash one input on several."""
    if algo == "blake3":
        return blake3.blake3(max_threads=threads)
    if algo == "sha256":
        return hashlib.sha256()
    raise CheckpointError(f"unknown shard digest {algo!r}; this version checks {sorted(DIGESTS)}")


def file_digest(path: str | Path, algo: str = DIGEST, threads: int = ALL_CORES) -> str:
    """The hex digest of a file's bytes (BLAKE3 by default; ``b3sum`` prints the same)."""
    h = _hasher(algo, threads)
    buf = memoryview(bytearray(16 * 1024 * 1024))  # one reused buffer: no fresh pages per chunk
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return str(h.hexdigest())


def read_safetensors_header(path: str | Path) -> tuple[bytes, dict[str, Any]]:
    """A safetensors file's prefix (8-byte length + JSON header; tensor data starts at ``len(prefix)``) and
    the parsed header: ``{name: {dtype, shape, data_offsets}, "__metadata__": ...}``."""
    with open(path, "rb") as f:
        head = f.read(8)
        prefix = head + f.read(int.from_bytes(head, "little"))
    return prefix, json.loads(prefix[8:])


def _digest_written(path: Path, tensors: Mapping[str, torch.Tensor], algo: str = DIGEST) -> str:
    """The digest of the safetensors file ``save_file`` just wrote from ``tensors``, without reading its data
    back: the file is its header then each tensor's bytes in ``data_offsets`` order, so we hash the header
    from disk and the bytes from memory (one core: the caller computes the next shard on the other). Falls
    back to reading the file if the layout is not that."""
    prefix, header = read_safetensors_header(path)
    spans = sorted((tuple(v["data_offsets"]), k) for k, v in header.items() if k != "__metadata__")
    end = 0
    for (begin, stop), k in spans:
        t = tensors[k]
        if begin != end or stop - begin != t.numel() * t.element_size():
            return file_digest(path, algo, threads=1)
        end = stop
    if len(prefix) + end != path.stat().st_size:
        return file_digest(path, algo, threads=1)
    h = _hasher(algo)
    h.update(prefix)
    for _, k in spans:
        t = tensors[k]
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return str(h.hexdigest())


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``directory`` in one rename.

    On an exception the temporary directory is removed and ``directory`` is left as it was.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointWriter:
    """Streams tensors into size-bounded safetensors shards; ``close()`` writes the index and config.

    Memory stays bounded by two shards: a caller adds tensors one at a time (growth of a 100 GB model) while
    the previous shard is written and hashed on a background thread, so producing tensors and writing bytes
    overlap (safetensors and the hashers release the GIL). Do not modify a tensor in place after ``add``; the
    bytes on disk are the tensor's when its shard is written, at the latest when ``close()`` returns.
    Write into an ``atomic_directory`` (``save_checkpoint`` does) so a crash leaves nothing behind, and use
    the writer as a context manager: on an error it waits for the shard in flight before the directory goes.
    ``config`` is a ModelConfig, or a plain dict written as is (a Hugging Face config on export).
    """

    def __init__(self, directory: str | Path, config: ModelConfig | dict[str, Any],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self._hashes: dict[str, str] = {}  # temporary file name -> DIGEST
        self._keys: set[str] = set()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._in_flight: Future[None] | None = None
        self._closed = False
        self.total_size = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def abort(self) -> None:
        """Stop without writing the index: wait for the shard in flight (its error is dropped)."""
        self._closed = True
        if self._in_flight is not None:
            self._in_flight.exception()
            self._in_flight = None
        self._io.shutdown(wait=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._keys:
            raise CheckpointError(f"tensor {name!r} added twice to checkpoint {self.dir}")
        self._keys.add(name)
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def _write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.dir / name
        save_file(tensors, str(path), metadata={"format": "pt"})
        self._hashes[name] = _digest_written(path, tensors)

    def _wait(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()  # re-raises the writer thread's error (disk full, ...) here

    def _flush(self) -> None:
        if not self._pending:
            return
        self._wait()  # at most one shard in flight: memory stays bounded
        name = f"shard-{len(self._written):05d}.safetensors.part"
        self._in_flight = self._io.submit(self._write_shard, name, self._pending)
        self._written.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> Path:
        if self._closed:
            raise CheckpointError(f"checkpoint writer for {self.dir} is already closed")
        self._closed = True
        try:
            self._flush()
            if not self._written:
                self._write_shard("shard-00000.safetensors.part", {})
                self._written.append(("shard-00000.safetensors.part", []))
            self._wait()
        finally:
            self._io.shutdown(wait=True)
        n = len(self._written)
        weight_map: dict[str, str] = {}
        files: dict[str, dict[str, Any]] = {}
        for i, (tmp_name, keys) in enumerate(self._written):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp_name, self.dir / final)
            files[final] = {"size": (self.dir / final).stat().st_size, DIGEST: self._hashes[tmp_name]}
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"format": FORMAT, "total_size": self.total_size, "files": files},
                 "weight_map": dict(sorted(weight_map.items()))}
        config = self.config if isinstance(self.config, dict) else to_dict(self.config)
        (self.dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2))  # last: marks the set complete
        return self.dir


def _model_keys(cfg: ModelConfig, buffers: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key the config implies, with its shape (built on the meta device: no memory); ``buffers=False``:
    the parameters only (what an optimizer holds state for)."""
    with torch.device("meta"):
        model = Aquila3(cfg)
    skip = set() if buffers else {name for name, _ in model.named_buffers()}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def save_checkpoint(directory: str | Path, state_dict: Mapping[str, torch.Tensor], config: ModelConfig,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Write a model checkpoint atomically; ``extra_files`` (name -> text/bytes) land beside it.

    The tied output projection is stored once (as ``embed.weight``).
    """
    expected = _model_keys(config)
    sd = {k: v for k, v in state_dict.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    _check_keys(sd.keys(), {k: tuple(v.shape) for k, v in sd.items()}, expected, f"state_dict for {directory}")
    with atomic_directory(directory) as tmp:
        with CheckpointWriter(tmp, config, max_shard_bytes) as writer:
            for k in sorted(sd):
                writer.add(k, sd[k])
        for name, content in (extra_files or {}).items():
            p = tmp / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
    return Path(directory)


def save_model(model: torch.nn.Module, directory: str | Path, **kwargs: Any) -> Path:
    """``save_checkpoint`` for an Aquila3 module."""
    return save_checkpoint(directory, model.state_dict(), model.config, **kwargs)  # type: ignore[arg-type]


def _check_keys(keys: Any, shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                what: str) -> None:
    missing = sorted(set(expected) - set(keys))
    unexpected = sorted(set(keys) - set(expected))
    wrong = [f"{k}: {shapes[k]} (config implies {expected[k]})" for k in sorted(set(keys) & set(expected))
             if tuple(shapes[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) the config does not have, e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}")
        raise CheckpointError(f"{what} does not match its config.json: " + "; ".join(parts))


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; not an aquila-ray checkpoint directory"
                              + _hint(Path(directory)))
    try:
        return from_dict(ModelConfig, json.loads(path.read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path} is not a valid model config: {e}") from e


def _hint(d: Path) -> str:
    if (d / "config.json").is_file() and any(d.glob("*.safetensors")) and not (d / INDEX_NAME).exists():
        return f" (a Hugging Face model? convert it: python -m jobs.convert_hf from-hf {d} CKPT)"
    if (d / "config.json").is_file() and '"model_type"' in (d / "config.json").read_text():
        return f" (a Hugging Face model? convert it: python -m jobs.convert_hf from-hf {d} CKPT)"
    return ""


class CheckpointReader:
    """Random access to a checkpoint's tensors without loading them all (streaming growth, online
    upcycling). Each shard's size and digest (BLAKE3; SHA-256 in format aquila-ray/1) are checked against the
    index the first time it is opened (``verify=False`` checks sizes only)."""

    def __init__(self, directory: str | Path, verify: bool = True) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {str(self.dir)!r} does not exist")
        index_path = self.dir / INDEX_NAME
        if not index_path.is_file():
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.dir} holds pickle weights {pickles[:3]}; aquila-ray never loads pickle (it can run "
                    f"arbitrary code). Save them as safetensors, or convert a Hugging Face model with "
                    f"python -m jobs.convert_hf from-hf HF_DIR CKPT")
            raise CheckpointError(f"{index_path} is missing: the checkpoint is incomplete or was not written "
                                  f"by aquila-ray" + _hint(self.dir))
        self.config = load_config(self.dir)
        try:
            index = json.loads(index_path.read_text())
            self.weight_map: dict[str, str] = index["weight_map"]
            self.files: dict[str, dict[str, Any]] = index["metadata"]["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is corrupted: {e}") from e
        self.verify = verify
        self._handles: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _check(self, fname: str) -> Path:
        """The shard's path after its size check; raises CheckpointError when it is missing or truncated."""
        path = self.dir / fname
        meta = self.files.get(fname)
        if meta is None:
            raise CheckpointError(f"{self.dir / INDEX_NAME} maps tensors to {fname} but lists no size/hash for it")
        if not path.is_file():
            raise CheckpointError(f"shard {path} listed in the index is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"shard {path} has {size} bytes, the index says {meta['size']}: "
                                  f"truncated or overwritten")
        return path

    def _digest_algo(self, fname: str) -> str:
        meta = self.files[fname]
        algo = next((a for a in DIGESTS if a in meta), None)
        if algo is None:
            raise CheckpointError(f"{self.dir / INDEX_NAME} lists no digest for {fname} (expected one of "
                                  f"{sorted(DIGESTS)}); load it with verify=False to skip the check")
        return algo

    def _verify(self, fnames: list[str]) -> None:
        """Size-check, and with ``verify`` hash, the shards not opened yet; shards hash on parallel threads and
        BLAKE3 spreads each over the cores (the hashers release the GIL)."""
        todo = [f for f in dict.fromkeys(fnames) if f not in self._handles]
        paths = [self._check(f) for f in todo]
        if self.verify and paths:
            algos = [self._digest_algo(f) for f in todo]
            with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
                digests = list(pool.map(file_digest, paths, algos))
            for fname, path, algo, digest in zip(todo, paths, algos, digests, strict=True):
                if digest != self.files[fname][algo]:
                    raise CheckpointError(f"shard {path} fails its {DIGESTS[algo]} check: the file was modified "
                                          f"or corrupted")
        for fname, path in zip(todo, paths, strict=True):
            try:
                self._handles[fname] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"shard {path} is not a valid safetensors file: {e}") from e

    def _open(self, fname: str) -> Any:
        if fname not in self._handles:
            self._verify([fname])
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.dir}")
        return self._open(self.weight_map[name]).get_tensor(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = {}
            self._verify(list(self.weight_map.values()))
            for fname in dict.fromkeys(self.weight_map.values()):
                h = self._open(fname)
                for k in h.keys():
                    self._shapes[k] = tuple(h.get_slice(k).get_shape())
        return self._shapes

    def check_matches_config(self) -> None:
        shapes = self.shapes()
        _check_keys(shapes.keys(), shapes, _model_keys(self.config), f"checkpoint {self.dir}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}


def load_state_dict(directory: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """All tensors and the config, after the integrity and config-match checks."""
    reader = CheckpointReader(directory, verify=verify)
    reader.check_matches_config()
    return reader.state_dict(), reader.config


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """An Aquila3 (dense or MoE) in eval mode with the checkpoint's weights, cast to ``dtype`` (fp32)."""
    sd, cfg = load_state_dict(directory)
    with torch.device("meta"):
        model = Aquila3(cfg)
    model.load_state_dict(sd, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device=device, dtype=dtype or torch.float32).eval()

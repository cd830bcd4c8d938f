"""Sharded training checkpoints: every rank writes only the state it owns; any world size reads them back.

A training checkpoint is one directory that Ray Train assembles from every rank's files (each rank calls
``ray.train.report(checkpoint=...)`` with its own directory; Ray Train merges them into one registered
checkpoint on the storage path and registers it only once every rank has uploaded):

- ``state/shard-NNNNN-model-IIIII-of-MMMMM.safetensors``: rank N-1's fragments (in files of about
  ``checkpoint.state_file_bytes``: ``state_file_index``), written by
  ``torch.distributed.checkpoint`` (DCP) through its Hugging Face safetensors storage. Each key is one
  flattened parameter: ``weight/NAME`` (the fp32 master weights), ``exp_avg/NAME`` and ``exp_avg_sq/NAME``
  (Adam's moments), and a rank stores the contiguous slice of it that its ZeRO partition (or its experts)
  owns, with the slice's offset in the safetensors metadata (``DCP_SHARDING_INFO``). No file holds the
  whole state; on load DCP's planner maps the saved slices onto the loading rank's slices whatever the
  world size or expert-parallel size, and reads only those byte ranges (``safe_open(...).get_slice``).
- ``trainer_state.json`` (rank 0): step, data position, optimizer step, world size, the model config;
- ``rng-rank-NNNNN.safetensors``: each rank's torch RNG state;
- ``train_config.json`` (rank 0): the TrainConfig of the run that wrote it;
- at the end of a run (and every ``checkpoint.export_every`` steps): the model checkpoint
  (``config.json``, safetensors shards, index; what ``aquila_ray.load_model``, growth, upcycling and the HF
  export read), streamed one tensor at a time by rank 0.

Why DCP with safetensors storage and not DeepSpeed's ``save_checkpoint``: DeepSpeed's ZeRO checkpoints
load only at the world size that wrote them (a world-size change needs an offline universal-checkpoint
conversion of the whole state) and are pickles; DCP reshards on load, and its safetensors storage keeps
the metadata in JSON headers, so nothing is unpickled (docs/training.md, "Checkpoints").
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageWriter

# DCP's Hugging Face storage names (file names, header keys): private in torch, so the writer below produces
# exactly what HuggingFaceStorageReader parses; tests read every saved file back through that reader.
from torch.distributed.checkpoint._hf_utils import (
    CUSTOM_METADATA_KEY,
    DCP_VERSION_KEY,
    DTYPE_MAP,
    FORMAT_KEY,
    FORMAT_VALUE,
    HF_DCP_VERSION,
    SAVED_OFFSETS_KEY,
    _gen_file_name,
)
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, WriteResult
from torch.futures import Future

from aquila_ray.checkpoint import CheckpointWriter
from aquila_ray.checkpoint.io import DEFAULT_SHARD_BYTES, _model_keys, atomic_directory
from aquila_ray.config.base import from_dict
from aquila_ray.config.model import ModelConfig
from aquila_ray.data.shards import join_location, read_bytes, resolve_location
from aquila_ray.errors import CheckpointError

STATE_DIR = "state"
TRAINER_STATE_NAME = "trainer_state.json"
TRAIN_CONFIG_NAME = "train_config.json"
BUFFERS_NAME = "buffers.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT, ADAM_KEYS = "weight", ("exp_avg", "exp_avg_sq")
STATE_KINDS = (WEIGHT, *ADAM_KEYS)
SHARDING_KEY = "DCP_SHARDING_INFO"
STAGING_BYTES = 64 * 2**20
"""The most a save copies from the device to the host at once (``StreamingStateWriter``)."""


def rng_name(rank: int) -> str:
    return f"rng-rank-{rank:05d}.safetensors"


def state_key(kind: str, name: str) -> str:
    """The checkpoint key of parameter ``name``'s ``kind`` (weight, exp_avg, exp_avg_sq)."""
    return f"{kind}/{name}"


class Fragment(torch.Tensor):
    """The slice ``[offset, offset + local.numel())`` of a flattened tensor of ``numel`` elements, which is
    what a ZeRO partition holds of a parameter. DCP sees it as one chunk of a 1-D tensor through the
    checkpointable protocol DTensor implements (``__create_write_items__``, ``__create_chunk_list__``,
    ``__get_tensor_shard__``); ``local`` is a view into the optimizer's buffers, so a load writes in place.
    It carries no data of its own and supports no tensor operations."""

    _local: torch.Tensor
    _offset: int

    @staticmethod
    def __new__(cls, local: torch.Tensor, offset: int, numel: int) -> Fragment:
        r = torch.Tensor._make_wrapper_subclass(cls, (numel,), dtype=local.dtype, device=local.device)
        r._local, r._offset = local, offset
        return r  # type: ignore[no-any-return]

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size([self._offset]), sizes=torch.Size([self._local.numel()]))

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size([self._offset])), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=self._chunk(), size=self.size(),
                                                      properties=TensorProperties.create_from_tensor(self._local)))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self._local

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        raise RuntimeError(f"a checkpoint Fragment supports no tensor operations (called {func})")

    @property
    def local_tensor(self) -> torch.Tensor:
        """The slice this rank holds (a view into its buffers)."""
        return self._local

    @property
    def start(self) -> int:
        """Where the slice starts in the flattened tensor."""
        return self._offset

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Fragment(offset={self._offset}, numel={self._local.numel()} of {self.numel()})"


def state_file_index(model_config: ModelConfig, world_size: int, file_bytes: int) -> dict[str, int]:
    """Which state file (1, 2, ...) each checkpoint key goes to, the same on every rank: parameters in name
    order, kinds side by side, a new file when a rank's expected share (1/world_size of the tensors, which
    also averages out the experts an expert-parallel rank holds) would pass ``file_bytes``. Files of a bounded
    size upload in parallel and resume in parallel; the save streams them (``StreamingStateWriter``), so the
    size does not change what a save holds in memory."""
    index: dict[str, int] = {}
    current, filled = 1, 0.0
    for name, shape in sorted(_model_keys(model_config, buffers=False).items()):
        share = 4 * torch.Size(shape).numel() / world_size
        for kind in STATE_KINDS:
            if filled and filled + share > file_bytes:
                current, filled = current + 1, 0.0
            index[state_key(kind, name)] = current
            filled += share
    return index


_SAFETENSORS_DTYPES = {dtype: name for name, dtype in DTYPE_MAP.items()}  # torch's table, inverted


class StreamingStateWriter(HuggingFaceStorageWriter):
    """DCP's Hugging Face safetensors storage, written as a stream: each file's header first (computed from
    the write items' shapes and dtypes), then every tensor's bytes straight from the optimizer's buffers
    (a device tensor is copied to the host ``STAGING_BYTES`` at a time). The files hold the same tensors and
    header metadata as ``HuggingFaceStorageWriter``'s (read back by ``HuggingFaceStorageReader`` and by
    ``safe_open``), but the stock writer builds each whole file in memory
    (``safetensors.torch.save``, after cloning every view whose storage is larger than itself), so a save
    held about four copies of a file; this one adds at most ``STAGING_BYTES`` (nothing on CPU)."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results: list[WriteResult] = []
        storage_plan: dict[str, int] | None = plan.storage_data.get("fqn_to_index_mapping")
        shard_index: int | None = plan.storage_data.get("shard_index")
        if plan.items:
            buckets = self._split_by_storage_plan(storage_plan, plan.items)
            highest = max(storage_plan.values()) if storage_plan is not None else 1
            for file_index, items in sorted(buckets.items()):
                name = _gen_file_name(file_index, highest, shard_index)
                results += self._write_file(self.fs.concat_path(self.path, name), name, items, planner)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_file(self, path: str | os.PathLike[str], name: str, items: list[WriteItem], planner: SavePlanner
                    ) -> list[WriteResult]:
        if any(item.type == WriteItemType.BYTE_IO or item.tensor_data is None for item in items):
            raise CheckpointError(f"{name}: the training state holds tensors only, got {items[0].index.fqn!r}")
        header: dict[str, Any] = {}
        sharding: dict[str, dict[str, list[int]]] = {}
        start = 0
        for item in items:
            chunk, dtype = item.tensor_data.chunk, item.tensor_data.properties.dtype  # type: ignore[union-attr]
            if dtype not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{item.index.fqn}: dtype {dtype} has no safetensors name")
            end = start + chunk.sizes.numel() * dtype.itemsize
            header[item.index.fqn] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(chunk.sizes),
                                      "data_offsets": [start, end]}
            sharding[item.index.fqn] = {SAVED_OFFSETS_KEY: list(chunk.offsets)}
            start = end
        header["__metadata__"] = {CUSTOM_METADATA_KEY: json.dumps(sharding), DCP_VERSION_KEY: str(HF_DCP_VERSION),
                                  FORMAT_KEY: FORMAT_VALUE}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        base = 8 + len(encoded)
        results = []
        with self.fs.create_stream(path, "wb") as stream:
            stream.write(len(encoded).to_bytes(8, "little"))
            stream.write(encoded)
            for item in items:
                tensor = planner.resolve_data(item)
                assert isinstance(tensor, torch.Tensor)
                meta = header[item.index.fqn]
                if list(tensor.shape) != meta["shape"]:
                    raise CheckpointError(f"{item.index.fqn}: planned shape {meta['shape']}, "
                                          f"got {list(tensor.shape)}")
                flat = tensor.detach().contiguous().reshape(-1)
                step = max(1, STAGING_BYTES // flat.element_size())
                for lo in range(0, flat.numel(), step):  # on CPU, .to("cpu") is the view itself: no copy
                    stream.write(flat[lo:lo + step].to("cpu").view(torch.uint8).numpy().data)
                first, last = meta["data_offsets"]
                results.append(WriteResult(index=item.index, size_in_bytes=last - first,
                                           storage_data=_StorageInfo(name, base + first, last - first)))
            if self.sync_files:
                stream.flush()
                os.fsync(stream.fileno())
        return results


def save_sharded_state(directory: str | Path, fragments: Mapping[str, torch.Tensor],
                       file_index: Mapping[str, int] | None = None) -> None:
    """Write this rank's fragments under ``directory/state``, split into files by ``file_index``
    (``state_file_index``; None: one file per rank), streamed (``StreamingStateWriter``). Collective (DCP
    plans over the default process group); each rank may pass its own local directory (Ray Train merges
    them)."""
    d = Path(directory) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    writer = StreamingStateWriter(str(d), save_distributed=True,
                                  fqn_to_index_mapping=dict(file_index) if file_index is not None else None)
    dcp.save(dict(fragments), storage_writer=writer)


@dataclass(frozen=True)
class _SavedRange:
    """Where one saved slice's bytes are: the file, the first byte, its shape and dtype."""

    path: str
    start: int
    shape: torch.Size
    dtype: torch.dtype


def _read_header(f: pa.NativeFile, name: str) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and where its data starts, from two range reads."""
    size = int.from_bytes(bytes(f.read_at(8, 0)), "little")
    if size <= 0 or size > f.size():
        raise CheckpointError(f"{name}: not a safetensors file (header length {size})")
    return dict(json.loads(bytes(f.read_at(size, 8)))), 8 + size


class RangeStateReader(StorageReader):
    """Reads the state files through a pyarrow filesystem (local, ``s3://``, ``gs://``) without
    downloading them: each rank parses 1/world of the files' headers (the ranks then share them, as DCP
    shares its plans), and reads only the byte ranges of the slices it loads, straight into its buffers (a
    device buffer through a host piece of ``STAGING_BYTES``). The files are DCP's Hugging Face safetensors
    layout (``StreamingStateWriter``, ``HuggingFaceStorageWriter``)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str) -> None:
        super().__init__()
        self.fs, self.path = filesystem, path.rstrip("/")
        self.storage_data: dict[MetadataIndex, _SavedRange] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def _headers(self) -> list[tuple[str, dict[str, Any], int]]:
        files = sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(self.path))
                       if i.type == pafs.FileType.File and i.path.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{self.path} holds no safetensors state files")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = []
        for path in files[rank::world]:
            with self.fs.open_input_file(path) as f:
                header, start = _read_header(f, path)
            mine.append((path, header, start))
        if world == 1:
            return mine
        # every rank gets every header, as every rank reads DCP's own .metadata file: a few hundred bytes per
        # (tensor, saving rank that holds a slice of it), bounded by the architecture (layers x experts) and
        # the world size, never by the parameter count; the tensors' bytes stay where they are
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        return [entry for part in everyone for entry in part]

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        tensors: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, _SavedRange] = {}
        for path, header, start in self._headers():
            sharding = json.loads(header.get("__metadata__", {}).get(CUSTOM_METADATA_KEY, "{}"))
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                shape, dtype = torch.Size(entry["shape"]), DTYPE_MAP[entry["dtype"]]
                offsets = torch.Size(sharding.get(key, {}).get(SAVED_OFFSETS_KEY, [0] * len(shape)))
                meta = tensors.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=dtype), shape, []))
                meta.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=shape))
                meta.size = torch.Size(max(a, o + n) for a, o, n in zip(meta.size, offsets, shape, strict=True))
                storage[MetadataIndex(key, offsets)] = _SavedRange(path, start + entry["data_offsets"][0], shape,
                                                                   dtype)
        return Metadata(state_dict_metadata=tensors, storage_data=storage)  # type: ignore[arg-type]

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].path, []).append(item)
        for path, items in sorted(by_file.items()):
            with self.fs.open_input_file(path) as f:
                for item in items:
                    self._read_item(f, item, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_item(self, f: pa.NativeFile, item: ReadItem, planner: LoadPlanner) -> None:
        saved = self.storage_data[item.storage_index]
        row = math.prod(saved.shape[1:])
        if any(o != 0 or n != d for o, n, d in zip(item.storage_offsets[1:], item.lengths[1:], saved.shape[1:],
                                                   strict=True)):
            raise CheckpointError(f"{item.storage_index.fqn}: only whole-row slices can be read as one range")
        target = planner.resolve_tensor(item).detach()
        numel = math.prod(item.lengths)
        if target.numel() != numel or target.dtype != saved.dtype:
            raise CheckpointError(f"{item.storage_index.fqn}: the load asks for {numel} {saved.dtype} values, "
                                  f"the buffer holds {target.numel()} {target.dtype}")
        size = saved.dtype.itemsize
        first = saved.start + item.storage_offsets[0] * row * size
        # the buffers are contiguous slices of the optimizer's flat buffers; anything else is read whole first
        dest = target.view(-1) if target.is_contiguous() else torch.empty(numel, dtype=saved.dtype)
        direct = dest.device.type == "cpu"
        step = max(1, STAGING_BYTES // size) if target.is_contiguous() else numel
        f.seek(first)
        for lo in range(0, numel, step):
            piece = dest[lo:lo + step] if direct else torch.empty(min(step, numel - lo), dtype=saved.dtype)
            if f.readinto(piece.view(torch.uint8).numpy().data) != piece.numel() * size:
                raise CheckpointError(f"{saved.path}: truncated at {item.storage_index.fqn}")
            if not direct:
                dest[lo:lo + piece.numel()].copy_(piece)
        if not target.is_contiguous():
            target.copy_(dest.view(target.shape))
        planner.commit_tensor(item, target)


def _state_location(directory: str | Path, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    fs, root = resolve_location(directory, filesystem)
    state = f"{root.rstrip('/')}/{STATE_DIR}"
    if fs.get_file_info(state).type != pafs.FileType.Directory:
        raise CheckpointError(f"{directory} has no {STATE_DIR}/ directory: not a sharded training checkpoint "
                              f"(a model checkpoint starts a new run with init=checkpoint, init_from={directory})")
    return fs, state


def load_sharded_state(directory: str | Path, fragments: Mapping[str, torch.Tensor],
                       filesystem: pafs.FileSystem | None = None) -> None:
    """Fill ``fragments`` (views into this rank's buffers) from a checkpoint written at any world size, in
    place on its storage (a local path, a URI, or a path inside ``filesystem``: ``RangeStateReader``).
    Collective. A key the checkpoint lacks raises CheckpointError naming it."""
    fs, state = _state_location(directory, filesystem)
    try:
        dcp.load(dict(fragments), storage_reader=RangeStateReader(fs, state))
    except RuntimeError as e:
        if "Missing key in checkpoint" in str(e):
            raise CheckpointError(f"{directory} does not match this model: {e}") from e
        raise


def _state_files(directory: Path) -> list[Path]:
    files = sorted((directory / STATE_DIR).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}/{STATE_DIR} holds no safetensors files")
    return files


def saved_chunks(directory: str | Path) -> dict[str, list[tuple[int, int, Path]]]:
    """Per key, the saved slices as (offset, numel, file), read from the safetensors headers only."""
    out: dict[str, list[tuple[int, int, Path]]] = {}
    for path in _state_files(Path(directory)):
        with safe_open(str(path), framework="pt") as f:
            offsets = json.loads((f.metadata() or {}).get(SHARDING_KEY, "{}"))
            for key in f.keys():
                numel = int(torch.Size(f.get_slice(key).get_shape()).numel())
                out.setdefault(key, []).append((int(offsets.get(key, {}).get("saved_offsets", [0])[0]), numel, path))
    for chunks in out.values():
        chunks.sort()
    return out


def iter_saved_tensors(directory: str | Path, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, whole flattened tensor) for each saved key, one at a time, assembled from every rank's slice:
    memory is bounded by the largest tensor. For tools, tests and ``export_model``, not for training."""
    chunks = saved_chunks(directory)
    for key in keys if keys is not None else sorted(chunks):
        parts = chunks.get(key)
        if parts is None:
            raise CheckpointError(f"{directory} has no saved tensor {key!r}")
        numel = max(off + n for off, n, _ in parts)
        if sum(n for _, n, _ in parts) != numel:
            raise CheckpointError(f"{directory}: the saved slices of {key!r} do not tile it exactly")
        pieces = []
        for _, _, path in parts:
            with safe_open(str(path), framework="pt") as f:
                pieces.append(f.get_tensor(key))
        yield key, torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, default=str))


def read_trainer_state(directory: str | Path, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    raw = read_bytes(join_location(directory, TRAINER_STATE_NAME), filesystem)
    if raw is None:
        raise CheckpointError(f"{directory} has no {TRAINER_STATE_NAME}: not a training checkpoint (a model "
                              f"checkpoint starts a new run with init=checkpoint, init_from={directory})")
    return dict(json.loads(raw))


def read_rng(directory: str | Path, rank: int, same_world_size: bool,
             filesystem: pafs.FileSystem | None = None) -> torch.Tensor | None:
    """This rank's saved RNG state when the world size is unchanged, else rank 0's (or None)."""
    raw = read_bytes(join_location(directory, rng_name(rank if same_world_size else 0)), filesystem)
    return safetensors_load(raw)["torch_cpu"] if raw is not None else None


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that belong to the model checkpoint (in ``state_dict``), by name."""
    state = model.state_dict(keep_vars=True)
    return {name: b for name, b in model.named_buffers() if name in state}


def save_buffers(directory: str | Path, model: torch.nn.Module) -> None:
    """The model's persistent buffers (the routers' balancing biases: layers x experts floats, replicated on
    every rank), written by rank 0 beside the state. Nothing when the model has none."""
    buffers = {k: v.detach().cpu().contiguous() for k, v in persistent_buffers(model).items()}
    if buffers:
        save_file(buffers, str(Path(directory) / BUFFERS_NAME))


@torch.no_grad()
def load_buffers(directory: str | Path, model: torch.nn.Module, filesystem: pafs.FileSystem | None = None) -> None:
    """Restore what ``save_buffers`` wrote into ``model``'s persistent buffers (every rank reads the file)."""
    wanted = persistent_buffers(model)
    if not wanted:
        return
    raw = read_bytes(join_location(directory, BUFFERS_NAME), filesystem)
    saved = safetensors_load(raw) if raw is not None else {}
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CheckpointError(f"{directory} lacks the model buffers {missing[:3]} (of {len(missing)}) in "
                              f"{BUFFERS_NAME}; was it saved by a model without them (e.g. "
                              f"MoEConfig.bias_update_rate=0)?")
    for name, t in wanted.items():
        t.copy_(saved[name])


def model_config_of(trainer_state: Mapping[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, trainer_state["model_config"])


def export_model(directory: str | Path, output: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the model checkpoint (config.json + safetensors + index) of a sharded training checkpoint,
    consolidating one tensor at a time (memory: the largest tensor plus one output shard)."""
    cfg = model_config_of(read_trainer_state(directory))
    shapes = _model_keys(cfg, buffers=False)
    keys = [state_key(WEIGHT, name) for name in sorted(shapes)]
    buffers = sorted(set(_model_keys(cfg)) - set(shapes))
    with atomic_directory(output) as tmp, CheckpointWriter(tmp, cfg, max_shard_bytes) as writer:
        for key, flat in iter_saved_tensors(directory, keys):
            name = key.split("/", 1)[1]
            writer.add(name, flat.reshape(shapes[name]))
        if buffers:
            saved = load_file(str(Path(directory) / BUFFERS_NAME))
            for name in buffers:
                writer.add(name, saved[name])
        for name in TOKENIZER_FILES:  # the data's tokenizer, which the trainer stores in every checkpoint
            if (Path(directory) / name).is_file():
                shutil.copyfile(Path(directory) / name, tmp / name)
    return Path(output)

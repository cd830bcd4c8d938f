"""Growing a checkpoint directory, tensor by tensor, with bounded memory, and writing ``growth_report.json``.

The Scale-Up step between EfficientScale's stage 1 and stage 2 (AquilaMoE, arXiv 2408.06567). Source
tensors are read from the (sharded) safetensors on demand and kept only while a target layer needs them
(AKI reads layer l and l + 1); target tensors stream into size-bounded shards, each written and hashed on
the checkpoint writer's thread while the next is computed. Peak memory is about two source blocks, one
target block and two output shards (one filling, one being written). The probe forward of the grown model
runs on the tensors as they are produced, so the output is never read back.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from aquila_ray.checkpoint import CheckpointReader, CheckpointWriter, atomic_directory
from aquila_ray.checkpoint.io import DEFAULT_SHARD_BYTES, read_safetensors_header
from aquila_ray.config import ModelConfig, to_dict
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.errors import CheckpointError
from aquila_ray.growth.plan import GrowthPlan, make_plan
from aquila_ray.growth.probe import ProbeForward, compare, layer_groups, probe, probe_tokens
from aquila_ray.growth.transform import source_keys_for, target_keys, target_shapes, target_tensor

REPORT_NAME = "growth_report.json"

NORM_DESCRIPTION = {
    "exact": "sqrt-split: residual writers and readers scaled by 1/sqrt(c), gamma*sqrt(D_S/D_T), eps*D_S/D_T "
             "(exact at any width ratio)",
    "paper": "plain 1/c fan-in splitting, copied gamma (exact only with equal copy counts)",
}
METHOD_DESCRIPTION = {
    "fpi": "FPI: function-preserving initialization (Net2Net; bert2BERT, ACL 2022)",
    "aki": "AKI: advanced knowledge initialization, new units from the layer above (bert2BERT, ACL 2022)",
    "aki-pro": "AKI-Pro: AKI + depth interpolation + GQA compatibility (AquilaMoE, arXiv 2408.06567)",
}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _PlainReads:
    """Reads tensors of a verified checkpoint with plain file reads instead of mmap, so source pages land in
    the page cache, not in this process's resident set (peak RSS stays bounded by what we hold)."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self.headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def _header(self, fname: str) -> tuple[int, dict[str, Any]]:
        if fname not in self.headers:
            prefix, header = read_safetensors_header(self.reader.dir / fname)
            self.headers[fname] = (len(prefix), header)
        return self.headers[fname]

    def get(self, name: str) -> torch.Tensor:
        fname = self.reader.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.reader.dir}")
        start, header = self._header(fname)
        meta = header[name]
        begin, end = meta["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)  # torch's allocator (huge pages with TRANSFORM_ENV)
        view, done = buf.numpy().data, 0
        with open(self.reader.dir / fname, "rb", buffering=0) as f:
            f.seek(start + begin)
            while done < len(view):  # one read() returns at most ~2 GiB
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"shard {self.reader.dir / fname} ends inside tensor {name!r}: truncated")
                done += n
        return buf.view(_DTYPES[meta["dtype"]]).reshape(meta["shape"])


class _SourceCache:
    """Source tensors by name; ``keep_only`` drops everything a coming target layer does not need."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = _PlainReads(reader)
        self.cache: dict[str, torch.Tensor] = {}
        self.bytes_read = 0

    def get(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            t = self.reader.get(name)
            self.bytes_read += t.numel() * t.element_size()
            self.cache[name] = t
        return self.cache[name]

    def keep_only(self, names: set[str]) -> None:
        for k in [k for k in self.cache if k not in names]:
            del self.cache[k]


@contextlib.contextmanager
def _one_core_for_the_writer() -> Iterator[None]:
    """Leave a core to the checkpoint writer's thread (it writes and hashes the previous shard while the next is
    computed): with all cores on torch ops too, both sides slowed down (3 paired profiling runs of
    bench/grow.py's growth on 2 cores: 3.2-3.9 s with one torch thread, 3.7-4.9 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def grow_checkpoint(src_dir: str | Path, dst_dir: str | Path, target: ModelConfig, options: GrowthConfig,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, verify: bool = True) -> dict[str, Any]:
    """Grow the checkpoint at ``src_dir`` into ``target``'s shape at ``dst_dir`` (atomic; the report lands
    inside it as ``growth_report.json``); returns the report."""
    t0 = time.perf_counter()
    reader = CheckpointReader(src_dir, verify=verify)
    src = reader.config
    reader.check_matches_config()  # opens (and with verify, hashes) every shard
    plan = make_plan(src, target, options)
    if Path(dst_dir).resolve() == Path(src_dir).resolve():
        raise CheckpointError(f"--dst {dst_dir} is the source checkpoint; write the grown model elsewhere")
    tokens = probe_tokens(src, options.probe_batch, options.probe_seq_len, options.seed)
    cache = _SourceCache(reader)
    fwd = ProbeForward(plan.dst, tokens) if options.probe else None
    keys = target_keys(plan.dst)
    dtypes: set[str] = set()
    t_write = time.perf_counter()
    with atomic_directory(dst_dir) as tmp, _one_core_for_the_writer():
        with CheckpointWriter(tmp, plan.dst, max_shard_bytes) as writer:
            produced: dict[str, torch.Tensor] = {}
            for layer, group in layer_groups(keys):
                cache.keep_only({s for k in group for s in source_keys_for(plan, k)})
                for k in group:
                    t = target_tensor(plan, k, cache.get)
                    dtypes.add(str(t.dtype).removeprefix("torch."))
                    writer.add(k, t)
                    produced[k] = t
                if fwd is not None:
                    fwd.feed(layer, produced)
                produced.clear()
            cache.keep_only(set())
        write_s = time.perf_counter() - t_write
        report = _report(plan, src_dir, dst_dir, reader, writer.total_size, cache.bytes_read, sorted(dtypes))
        if options.probe:
            assert fwd is not None
            t_probe = time.perf_counter()
            before = probe(src, _PlainReads(reader).get, tokens)
            after = fwd.finish()
            report["probe"] = {"tokens": list(tokens[:, :-1].shape), "seed": options.seed, "dtype": "float64",
                               **compare(before, after), "seconds": round(time.perf_counter() - t_probe, 3)}
        report["seconds"] = {"grow_and_write": round(write_s, 3), "total": round(time.perf_counter() - t0, 3)}
        report["peak_rss_bytes"] = _peak_rss_bytes()
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def _report(plan: GrowthPlan, src_dir: str | Path, dst_dir: str | Path, reader: CheckpointReader,
            bytes_written: int, bytes_read: int, dtypes: list[str]) -> dict[str, Any]:
    o = plan.options
    return {
        "source": str(src_dir),
        "destination": str(dst_dir),
        "method": o.method,
        "method_description": METHOD_DESCRIPTION[o.method],
        "options": to_dict(o),
        "depth_mode": plan.depth_mode,
        "norm_mode": o.norm_mode,
        "norm_description": NORM_DESCRIPTION[o.norm_mode],
        "map": o.map,
        "seed": o.seed,
        "function_preserving_by_construction": function_preserving(plan),
        "plan": plan.summary(),
        "shapes": {"before": {k: list(v) for k, v in reader.shapes().items()},
                   "after": {k: list(v) for k, v in _target_shapes(plan).items()}},
        "parameters": {"before": plan.src.num_params(), "after": plan.dst.num_params()},
        "dtypes": dtypes,
        "bytes": {"source_read": bytes_read, "written": bytes_written},
        "source_config": to_dict(plan.src),
        "target_config": to_dict(plan.dst),
    }


def _target_shapes(plan: GrowthPlan) -> dict[str, tuple[int, ...]]:
    return target_shapes(plan.dst)


def function_preserving(plan: GrowthPlan) -> bool:
    """Whether the plan computes the source function exactly (up to rounding)."""
    if plan.options.method != "fpi":
        return False
    if plan.src.num_layers != plan.dst.num_layers and plan.depth_mode != "identity":
        return False
    if plan.options.norm_mode == "paper":
        # plain 1/c splitting is exact only when every hidden unit has the same number of copies (untied)
        equal_copies = len(set(plan.hidden.counts())) == 1 and not plan.src.tie_embeddings
        return equal_copies or plan.hidden.is_identity
    return True


def memory_estimate_bytes(plan: GrowthPlan, bytes_per_param: int = 4, max_shard_bytes: int = DEFAULT_SHARD_BYTES
                          ) -> int:
    """What ``grow_checkpoint`` holds at its peak: two source blocks (AKI), a target block with its float32
    intermediates, the embedding tables, two shards (one filling, one being written), the probe's float64
    block, and 512 MiB slack."""
    s, d = plan.src, plan.dst
    src_block = (s.attention_params() + s.mlp_params() + 2 * s.hidden_size) * bytes_per_param
    dst_block = (d.attention_params() + d.mlp_params() + 2 * d.hidden_size) * max(bytes_per_param, 4)
    tables = (s.vocab_size * s.hidden_size * bytes_per_param + d.vocab_size * d.hidden_size * 4) * 2
    probe = dst_block * 2 if plan.options.probe else 0
    shard = min(max_shard_bytes, d.num_params() * max(bytes_per_param, 4))
    return int(2 * src_block + 2 * dst_block + tables + 2 * shard + probe + 512 * 1024**2)

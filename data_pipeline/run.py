"""The data job: raw files -> clean/ + rejected/ + stats.json -> tokenizer.json -> tokens/ + manifest.json.

``prepare_data(config)`` runs four stages on Ray. Every corpus-wide operation is a Ray Data operation
(groupby, hash join, aggregation); the driver only plans input files and reads aggregated numbers, never a
per-document table (DESIGN.md "The flow of data", STYLE.md rule 14). Each stage's unit of work leaves its
output under a final name only when it is complete (temp name + rename), and a rerun skips every finished
unit: an input file's records, a records file's clean/rejected parts, a clean part's tokens, a token shard
(datatrove's completion markers, STYLE.md rule 8). A finished directory carries ``_SUCCESS`` with the
config fingerprint, so a rerun of the same command returns at once. All decisions are functions of the
document ``order`` and the seed, so a resumed run gives the same result as an uninterrupted one.

1. records: one Ray Data task per input file reads it and runs the StepChain (normalize, lang, quality,
   toxic, domain filter + tags, dedup signature) -> ``_work/records/part-<file>.parquet``, every input
   record with its reason.
2. clean: duplicates found on Ray Data (``dedup.duplicates_dataset``: groupby on the exact hash, MinHash
   LSH buckets, label propagation by joins) -> ``_work/dups/`` sorted by order; mixing rates from one
   anti-join + groupby aggregation over the survivors' (order, key, nchars); then one task per records
   file applies its own range of dup decisions (a merge join on ``order``), the split and mixing and
   writes ``clean/part-i.parquet`` and ``rejected/part-i.parquet``; ``stats.json`` is a groupby count over
   clean/ and rejected/.
3. tokenizer: train a byte-level BPE on a stratified per-language sample of clean/ drawn with Ray Data, or
   copy the given tokenizer.json.
4. tokens: one task per clean part tokenizes it -> ``_work/tokenized/part-i.parquet``; the shard count per
   split follows the token total (``pack.target_shard_bytes``); one ``groupby(split, shard).map_groups``
   reads every tokenized row once and writes ``tokens/{split}/part-XXXXX.arrow``; then ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from ray.data.aggregate import Sum
from ray.data.expressions import col
from tokenizers import Tokenizer

from aquila_ray.config.base import to_dict
from aquila_ray.data.shards import Manifest, ShardInfo, SplitInfo, write_manifest
from aquila_ray.errors import ConfigError, DataError
from data_pipeline import dedup
from data_pipeline.config import DataConfig
from data_pipeline.mixing import assign_split, copies_for, mixing_rates, unit_hash
from data_pipeline.output import Output
from data_pipeline.packing import pack_group
from data_pipeline.readers import InputFile, plan_inputs, read_file
from data_pipeline.steps import STEP_ORDER, StepChain
from data_pipeline.tokenizer import (
    Tokenize,
    eos_id,
    load_tokenizer,
    sample_for_tokenizer,
    tokenizer_json,
    train_tokenizer,
)

log = logging.getLogger(__name__)

WORK = "_work"
SUCCESS = "_SUCCESS"
RECORDS = f"{WORK}/records"
DUPS = f"{WORK}/dups"
COUNTS = f"{WORK}/counts"
TOKENIZED = f"{WORK}/tokenized"
TOKEN_COUNTS = f"{WORK}/token_counts"
ORDER_SHIFT = 32  # order = file_index << 32 | record_index (readers.ORDER_SHIFT)
READ_ROWS = 4096  # rows per batch when a task streams a Parquet part


# ------------------------------------------------------------------------------------------------ schemas
def records_schema(num_perm: int) -> pa.Schema:
    return pa.schema([
        ("order", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("url", pa.string()),
        ("text", pa.large_string()), ("nbytes", pa.int64()), ("nchars", pa.int64()), ("lang", pa.string()),
        ("lang_score", pa.float64()), ("domain", pa.string()), ("reason", pa.string()),
        ("exact_hash", pa.int64()), ("signature", pa.list_(pa.uint32(), num_perm)),
    ])


CLEAN_SCHEMA = pa.schema([
    ("order", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("lang", pa.string()),
    ("domain", pa.string()), ("split", pa.string()), ("copies", pa.int32()), ("url", pa.string()),
    ("text", pa.large_string()),
])
REJECTED_SCHEMA = pa.schema([
    ("order", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("lang", pa.string()),
    ("domain", pa.string()), ("reason", pa.string()), ("nbytes", pa.int64()), ("url", pa.string()),
    ("text", pa.large_string()),
])
DUPS_SCHEMA = pa.schema([("order", pa.int64()), ("dup_reason", pa.string())])
TOKENIZED_SCHEMA = pa.schema([
    ("order", pa.int64()), ("source", pa.string()), ("lang", pa.string()), ("split", pa.string()),
    ("copies", pa.int32()), ("nchars", pa.int64()), ("num_tokens", pa.int64()), ("ids", pa.list_(pa.uint32())),
])
STATS_KEYS = ["source", "lang", "reason", "domain"]
# Per-file summaries written next to a unit's output (small: one row per group), so the stage-wide numbers
# are one groupby over them instead of a scan of every document.
COUNTS_SCHEMA = pa.schema([("source", pa.string()), ("lang", pa.string()), ("reason", pa.string()),
                           ("domain", pa.string()), ("documents", pa.int64())])
TOKEN_COUNTS_SCHEMA = pa.schema([("split", pa.string()), ("lang", pa.string()), ("documents", pa.int64()),
                                 ("nchars", pa.int64()), ("num_tokens", pa.int64()), ("stored", pa.int64())])


class _ChainUDF:
    """The StepChain, output as an Arrow table with an explicit schema."""

    def __init__(self, config: DataConfig) -> None:
        self.chain = StepChain(config)
        self.schema = records_schema(_num_perm(config))

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        out = self.chain(batch)
        out["nchars"] = np.asarray([len(t) for t in out["text"]], dtype=np.int64)
        if "domain" not in out:  # the domain tagger is off: every document is "general"
            out["domain"] = np.asarray(["" if r else "general" for r in out["reason"]], dtype=object)
        sig = np.ascontiguousarray(out.pop("signature"), dtype=np.uint32)
        width = self.schema.field("signature").type.list_size
        arrays = {k: pa.array(list(v) if v.dtype == object else v, type=self.schema.field(k).type)
                  for k, v in out.items() if k in self.schema.names}
        arrays["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1), pa.uint32()), width)
        return pa.table([arrays[f.name] for f in self.schema], schema=self.schema)


_UDF_CACHE: dict[tuple[str, str], Any] = {}


def _cached(make: Any, key: str, *args: Any) -> Any:
    """One ``make(*args)`` per worker process and key: a setup-heavy object built once (the task-based
    counterpart of an actor)."""
    k = (make.__qualname__, key)
    if k not in _UDF_CACHE:
        _UDF_CACHE[k] = make(*args)
    return _UDF_CACHE[k]


def _num_perm(config: DataConfig) -> int:
    return config.dedup.num_bands * config.dedup.rows_per_band if config.dedup.fuzzy else 1


# ------------------------------------------------------------------------------------------------ helpers
def _ensure_ray() -> bool:
    """Start a local Ray if none is running (returns True when we started it)."""
    if ray.is_initialized():
        return False
    ray.init()
    return True


def _num_workers(config: DataConfig) -> int:
    if config.num_workers:
        return config.num_workers
    return max(1, int(ray.available_resources().get("CPU", 1)))


def _num_partitions(config: DataConfig) -> int:
    """Hash partitions of every shuffle (join, groupby): ``shuffle_partitions`` or two per cluster CPU."""
    if config.shuffle_partitions:
        return config.shuffle_partitions
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def _read_parquet(out: Output, rel: str, columns: list[str], alive_only: bool = False) -> Any:
    """A Ray Data dataset of ``columns`` of the Parquet files under ``out/rel`` (lazy; projection and the
    ``reason == ""`` filter are pushed into the read)."""
    ds = ray.data.read_parquet(out.uri(rel))
    if alive_only:
        ds = ds.filter(expr=col("reason") == "")
    return ds.select_columns(columns)


def _write_json(out: Output, rel: str, data: Any) -> None:
    out.write_text(rel, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False))


def _read_json(out: Output, rel: str) -> Any:
    return json.loads(out.read_text(rel))


def _part(index: int) -> str:
    return f"part-{index:05d}.parquet"


class _PartWriter:
    """One Parquet part written as a stream of tables; it appears at ``out/rel`` only when the ``with``
    block ends without an error (a crash leaves no part). An empty part still has the schema."""

    def __init__(self, out: Output, rel: str, schema: pa.Schema) -> None:
        self.out, self.rel, self.schema, self.rows = out, rel, schema, 0

    def __enter__(self) -> _PartWriter:
        self._sink = self.out.open(self.rel)
        self._writer = pq.ParquetWriter(self._sink.__enter__(), self.schema)
        return self

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))
        self.rows += table.num_rows

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None and self.rows == 0:
                self._writer.write_table(self.schema.empty_table())
            self._writer.close()
        finally:
            self._sink.__exit__(*exc)


def _write_parts(out: Output, rel: str, schema: pa.Schema, tables: Any) -> int:
    """Stream tables into one Parquet part at ``out/rel``; returns its rows."""
    with _PartWriter(out, rel, schema) as w:
        for t in tables:
            w.write(t)
    return w.rows


def _parquet_file(out: Output, rel: str) -> pq.ParquetFile:
    return pq.ParquetFile(out.fs.open_input_file(out.path(rel)))


def _per_file(config: DataConfig, items: list[dict[str, Any]], fn: Any, args: tuple[Any, ...]) -> int:
    """Run ``fn(item, *args) -> rows`` once per item as Ray Data tasks (one item per task, the cluster's
    CPUs in parallel, ``ray_compute: actors`` for an actor pool); the driver gets back only the row total."""
    if not items:
        return 0

    def call(batch: dict[str, Any]) -> dict[str, Any]:
        rows = [fn({k: v[i] for k, v in batch.items()}, *args) for i in range(len(batch["_i"]))]
        return {"rows": np.asarray(rows, dtype=np.int64)}

    ds: Any = ray.data.from_items([{"_i": i, **it} for i, it in enumerate(items)], override_num_blocks=len(items))
    if config.ray_compute == "actors":
        ds = ds.map_batches(_Caller, fn_constructor_args=(call,), batch_size=1, num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_num_workers(config)))
    else:
        ds = ds.map_batches(call, batch_size=1, num_cpus=1)
    # Streamed, one number per item: ``ds.sum`` would add an aggregation operator whose reserved CPU leaves
    # the map one task at a time on a small cluster (measured: 4 items of 3 s took 17.6 s on 2 CPUs, 9.4 s
    # streamed)
    return sum(int(b["rows"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


class _Caller:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.fn(batch)


def describe_plan(config: DataConfig) -> dict[str, Any]:
    """What ``--dry-run`` prints: the resolved inputs and the stages, without touching Ray or the output."""
    files = plan_inputs(config)
    return {
        "output": config.output,
        "fingerprint": config.fingerprint(),
        "inputs": [{"source": f.source, "path": f.path, "format": f.format} for f in files],
        "steps": list(STEP_ORDER[:-2]) + ["dedup.exact", "dedup.near", "mix", "split", "tokenize", "pack"],
        "tokenizer": config.tokenizer.path or f"train byte-level BPE, vocab {config.tokenizer.vocab_size}",
        "outputs": ["clean/", "rejected/", "stats.json", "tokenizer.json", "tokens/train/*.arrow",
                    "tokens/validation/*.arrow", "manifest.json"],
    }


# ------------------------------------------------------------------------------------------------ 1. records
def _records_file(item: dict[str, Any], config: DataConfig, out: str) -> int:
    """Read one input file, run the step chain, write ``_work/records/part-<file>.parquet``; returns its rows."""
    f = InputFile(**{k.name: item[k.name] for k in dataclasses.fields(InputFile)})
    chain = _cached(_ChainUDF, config.fingerprint(), config)
    tables = (chain(b) for b in read_file(f, config.max_doc_bytes))
    return _write_parts(Output(out), f"{RECORDS}/{_part(f.file_index)}", chain.schema, tables)


def _stage_records(config: DataConfig, out: Output) -> None:
    if out.is_file(f"{RECORDS}/{SUCCESS}"):
        return
    files = plan_inputs(config)
    todo = [f for f in files if not out.is_file(f"{RECORDS}/{_part(f.file_index)}")]
    log.info("records: %d of %d input files to read", len(todo), len(files))
    items = [dataclasses.asdict(f) for f in todo]
    _per_file(config, items, _records_file, (config, out.location))
    _write_json(out, f"{RECORDS}/{SUCCESS}", {"files": len(files)})


# ------------------------------------------------------------------------------------------------ 2. clean
def _stage_dups(config: DataConfig, out: Output) -> None:
    """``_work/dups/``: (order, dup_reason) of every duplicate, sorted by order, found on Ray Data; complete
    when it holds ``_SUCCESS`` (a directory of objects cannot be renamed into place atomically)."""
    if out.is_file(f"{DUPS}/{SUCCESS}"):
        return
    out.remove(DUPS)  # a run that stopped half-way through the write
    with out.open(f"{DUPS}/empty.parquet") as sink:  # readable even with no duplicates
        pq.write_table(DUPS_SCHEMA.empty_table(), sink)
    if config.dedup.exact or config.dedup.fuzzy:
        alive = _read_parquet(out, RECORDS, ["order", "exact_hash", "signature"], alive_only=True)
        dups = dedup.duplicates_dataset(alive, config.dedup, num_partitions=_num_partitions(config))
        dups.sort("order").write_parquet(out.uri(DUPS))
    _write_json(out, f"{DUPS}/{SUCCESS}", {})


def _mix_key(config: DataConfig) -> str:
    return config.mix.by


def _mix_weights(config: DataConfig) -> dict[str, float | None]:
    if config.mix.by == "domain":
        return dict(config.mix.domain_weights)
    return {s.name: s.weight for s in config.sources}


def _train_keys(batch: pa.Table, key: str, seed: int, validation_fraction: float) -> pa.Table:
    """Ray Data UDF: the rows whose document lands in the train split, as (key, nchars)."""
    orders = batch.column("order").to_pylist()
    train = [assign_split(o, seed, validation_fraction) == "train" for o in orders]
    return batch.filter(pa.array(train, pa.bool_())).select([key, "nchars"])


def _stage_mixing(config: DataConfig, out: Output) -> dict[str, Any]:
    """Mixing rates from each key's train characters after dedup: one anti-join of the survivors'
    (order, key, nchars) with the duplicates, then a groupby sum; the driver reads one row per key."""
    rel = f"{WORK}/mixing.json"
    if out.is_file(rel):
        return _read_json(out, rel)
    key = _mix_key(config)
    alive = _read_parquet(out, RECORDS, ["order", key, "nchars"], alive_only=True)
    dup_orders = _read_parquet(out, DUPS, ["order"])
    kept = alive
    if dup_orders.count():  # from the Parquet footers; an empty side has no columns to join on
        kept = alive.join(dup_orders, join_type="left_anti", on=("order",), num_partitions=_num_partitions(config))
    train = kept.map_batches(_train_keys, batch_format="pyarrow",
                             fn_kwargs={"key": key, "seed": config.mix.seed,
                                        "validation_fraction": config.mix.validation_fraction})
    chars: dict[str, int] = {k: 0 for k, w in _mix_weights(config).items()}
    for row in train.groupby(key, num_partitions=1).sum("nchars").iter_rows():  # one row per source/domain
        chars[str(row[key])] = int(row["sum(nchars)"])
    weights = _mix_weights(config)
    mixing = {"by": key, "source_chars" if key == "source" else "domain_chars": chars,
              "rates": mixing_rates(chars, weights), "weights": weights}
    _write_json(out, rel, mixing)
    return mixing


def _finalize_file(item: dict[str, Any], location: str, rates: dict[str, float], key: str,
                   config: DataConfig) -> int:
    """Apply this file's dup decisions (its order range of the sorted dups: a merge join, not a broadcast),
    the split and mixing to one records file; write its documents per (source, lang, reason, domain) to
    ``_work/counts/``, then its rejected/ and clean/ parts (clean/ last: the unit's completion marker)."""
    out, index, rel = Output(location), int(item["index"]), str(item["path"])
    lo, hi = index << ORDER_SHIFT, (index + 1) << ORDER_SHIFT
    d = pads.dataset(out.path(DUPS), format="parquet", schema=DUPS_SCHEMA, filesystem=out.fs).to_table(
        filter=(pc.field("order") >= lo) & (pc.field("order") < hi))
    dup = dict(zip(d.column("order").to_pylist(), d.column("dup_reason").to_pylist(), strict=True))
    seed, vf = config.mix.seed, config.mix.validation_fraction
    columns = ["order", "id", "source", "url", "text", "nbytes", "lang", "domain", "reason"]
    counts: list[pa.Table] = []  # a few rows per batch: the (source, lang, reason, domain) groups

    def decide(t: dict[str, list[Any]]) -> tuple[pa.Table, pa.Table]:
        n = len(t["order"])
        reasons, splits, copies = list(t["reason"]), [""] * n, [1] * n
        for i, order in enumerate(t["order"]):
            reasons[i] = reasons[i] or dup.get(order, "")
            if reasons[i]:
                continue
            splits[i] = assign_split(order, seed, vf)
            if splits[i] == "train":
                copies[i] = copies_for(order, seed, rates.get(t[key][i], 1.0))
                if copies[i] == 0:
                    reasons[i] = "mix.downsampled"
        keep = pa.array([not r for r in reasons])
        full = pa.table({**{k: t[k] for k in columns if k != "reason"}, "reason": reasons, "split": splits,
                         "copies": pa.array(copies, pa.int32())})
        counts.append(full.group_by(STATS_KEYS, use_threads=False).aggregate([([], "count_all")]))
        rej = full.filter(pc.invert(keep))
        rej = rej.set_column(rej.schema.get_field_index("text"), "text",
                             pc.utf8_slice_codeunits(rej.column("text"), 0, config.rejected_text_chars))
        return full.filter(keep), rej

    name = _part(index)
    # streamed a batch at a time; the blocks end in the order counts, rejected/, clean/
    with _PartWriter(out, f"clean/{name}", CLEAN_SCHEMA) as clean, \
            _PartWriter(out, f"rejected/{name}", REJECTED_SCHEMA) as rejected:
        for batch in _parquet_file(out, rel).iter_batches(batch_size=READ_ROWS, columns=columns):
            c, r = decide(batch.to_pydict())
            clean.write(c)
            rejected.write(r)
        summed = [pa.concat_tables(counts).group_by(STATS_KEYS, use_threads=False).aggregate([("count_all", "sum")])
                  .rename_columns({"count_all_sum": "documents"})] if counts else []
        _write_parts(out, f"{COUNTS}/{name}", COUNTS_SCHEMA, summed)
    return clean.rows


def _stage_clean(config: DataConfig, out: Output) -> None:
    if out.is_file("stats.json"):
        return
    _stage_dups(config, out)
    mixing = _stage_mixing(config, out)
    parts = out.parts(RECORDS)
    todo = [{"index": i, "path": p} for i, p in parts if not out.is_file(f"clean/{_part(i)}")]
    log.info("clean: %d of %d records files to finalize", len(todo), len(parts))
    _per_file(config, todo, _finalize_file, (out.location, mixing["rates"], mixing["by"], config))
    # one groupby over the per-file counts; the driver reads one row per (source, lang, reason, domain)
    counts: Counter[tuple[str, ...]] = Counter()
    per_file = _read_parquet(out, COUNTS, COUNTS_SCHEMA.names)
    for row in per_file.groupby(STATS_KEYS, num_partitions=1).sum("documents").iter_rows():
        counts[tuple(row[k] for k in STATS_KEYS)] += int(row["sum(documents)"])
    stats = build_stats(counts)
    stats["mixing"] = mixing
    _write_json(out, "stats.json", stats)


def build_stats(counts: Counter[tuple[str, ...]]) -> dict[str, Any]:
    """stats.json from (source, lang, reason[, domain]) -> documents. Per step: in, kept, dropped per reason,
    in the order steps run; totals, per source, per language and per domain; and the check
    in == kept + dropped + invalid. Every input record is in exactly one count."""
    by_step: dict[str, Counter[str]] = {s: Counter() for s in STEP_ORDER}
    total = sum(counts.values())
    kept = sum(n for tup, n in counts.items() if not tup[2])
    for tup, n in counts.items():
        reason = tup[2]
        if reason:
            step = reason.split(".", 1)[0]
            by_step[step][reason] += n
    steps = []
    remaining = total
    for name in STEP_ORDER:
        dropped = sum(by_step[name].values())
        steps.append({"step": name, "in": remaining, "kept": remaining - dropped,
                      ("invalid" if name == "read" else "dropped"): dict(sorted(by_step[name].items()))})
        remaining -= dropped
    invalid = sum(by_step["read"].values())

    def group(key: int) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        for tup, n in sorted(counts.items()):
            if key >= len(tup):
                continue
            g = out.setdefault(tup[key] or "unknown", {"in": 0, "kept": 0, "dropped": {}, "invalid": {}})
            g["in"] += n
            reason = tup[2]
            if not reason:
                g["kept"] += n
            else:
                bucket = g["invalid"] if reason.startswith("read.") else g["dropped"]
                bucket[reason] = bucket.get(reason, 0) + n
        return out

    return {
        "total": {"in": total, "kept": kept, "dropped": total - kept - invalid, "invalid": invalid},
        "balanced": total == kept + (total - kept - invalid) + invalid and remaining == kept,
        "steps": steps,
        "by_source": group(0),
        "by_lang": group(1),
        "by_domain": group(3),
    }


# ------------------------------------------------------------------------------------------------ 3. tokenizer
def _stage_tokenizer(config: DataConfig, out: Output) -> None:
    if out.is_file("tokenizer.json"):
        return
    if config.tokenizer.path:
        tok = load_tokenizer(config.tokenizer.path)
        eos_id(tok, config.tokenizer.eos_token)
        out.write_bytes("tokenizer.json", Path(config.tokenizer.path).read_bytes())
        return
    sample = sample_for_tokenizer(_read_parquet(out, "clean", ["order", "lang", "source", "split", "text"]), config)
    tok = train_tokenizer(sample.texts(), config.tokenizer)
    if tok.get_vocab_size() < 257:
        raise DataError(f"tokenizer trained on too little text (vocab {tok.get_vocab_size()}); "
                        f"is clean/ empty? See {out.uri('stats.json')}")
    stats = _read_json(out, "stats.json")
    stats["tokenizer"] = sample.stats()  # written before tokenizer.json, the stage's completion marker
    _write_json(out, "stats.json", stats)
    out.write_text("tokenizer.json", tokenizer_json(tok))


# ------------------------------------------------------------------------------------------------ 4. tokens
def _tokenize_file(item: dict[str, Any], location: str, eos_token: str) -> int:
    """Tokenize one clean part -> ``_work/tokenized/part-i.parquet`` (ids end in EOS), streamed a batch at a
    time; then its totals per (split, lang) -> ``_work/token_counts/part-i.parquet``, the unit's completion
    marker (written last)."""
    out = Output(location)
    text = out.read_text("tokenizer.json")
    tokenize = _cached(_tokenize_step, _sha256(text), text, eos_token)
    totals: list[pa.Table] = []

    def tables() -> Any:
        for batch in _parquet_file(out, str(item["path"])).iter_batches(
                batch_size=512, columns=["order", "source", "lang", "split", "copies", "text"]):
            t = tokenize(batch.to_pydict())
            ids = list(t["ids"])
            offsets = np.zeros(len(ids) + 1, dtype=np.int32)
            np.cumsum([a.size for a in ids], out=offsets[1:])
            values = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)
            cols = {k: t[k] for k in ("order", "source", "lang", "split", "copies", "nchars", "num_tokens")}
            cols["ids"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.uint32()))
            table = pa.table(cols)
            totals.append(_token_totals(table))
            yield table

    name = _part(int(item["index"]))
    rows = _write_parts(out, f"{TOKENIZED}/{name}", TOKENIZED_SCHEMA, tables())
    summed = [_sum_totals(pa.concat_tables(totals))] if totals else []
    _write_parts(out, f"{TOKEN_COUNTS}/{name}", TOKEN_COUNTS_SCHEMA, summed)
    return rows


def _tokenize_step(tokenizer_json: str, eos_token: str) -> Tokenize:
    return Tokenize(Tokenizer.from_str(tokenizer_json), eos_token)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _token_totals(t: pa.Table) -> pa.Table:
    """Documents, characters, tokens and stored tokens (every copy of a train document is packed) per
    (split, lang) of a tokenized table."""
    stored = pc.multiply(t.column("num_tokens"), pc.cast(t.column("copies"), pa.int64()))
    t = t.select(["split", "lang", "nchars", "num_tokens"]).append_column("stored", stored)
    g = t.group_by(["split", "lang"], use_threads=False).aggregate(  # see tokenizer._block_counts
        [([], "count_all"), ("nchars", "sum"), ("num_tokens", "sum"), ("stored", "sum")])
    return g.rename_columns({"count_all": "documents", "nchars_sum": "nchars", "num_tokens_sum": "num_tokens",
                             "stored_sum": "stored"})


def _sum_totals(t: pa.Table) -> pa.Table:
    cols = ["documents", "nchars", "num_tokens", "stored"]
    g = t.group_by(["split", "lang"], use_threads=False).aggregate([(c, "sum") for c in cols])
    return g.rename_columns({f"{c}_sum": c for c in cols})


def _assign_shard(batch: pa.Table, seed: int, num_shards: dict[str, int]) -> pa.Table:
    """Ray Data UDF: the shard of every document, a hash of its order (stable across runs and workers)."""
    shards = [int(unit_hash(seed, int(o), "shard") * num_shards[str(s)])
              for o, s in zip(batch.column("order").to_pylist(), batch.column("split").to_pylist(), strict=True)]
    return batch.append_column("shard", pa.array(shards, pa.int32()))


def _pack_task(group: pa.Table, location: str, seq_len: int, eos: int) -> pa.Table:
    """Ray Data map_groups UDF: one (split, shard) group -> one token shard; returns one summary row."""
    split, shard = str(group.column("split")[0].as_py()), int(group.column("shard")[0].as_py())
    rel = f"tokens/{split}/part-{shard:05d}.arrow"
    r = pack_group(group, seq_len, eos, Output(location), rel)
    return pa.table({"split": [split], "shard": [shard], "path": [rel if r["num_sequences"] else ""],
                     "num_sequences": [r["num_sequences"]], "num_padding": [r["num_padding"]],
                     "tokens_per_source": [json.dumps(r["tokens_per_source"])]})


def _stage_tokens(config: DataConfig, out: Output) -> None:
    if out.is_file("manifest.json"):
        return
    tok_json = out.read_text("tokenizer.json")
    tok = Tokenizer.from_str(tok_json)
    eos = eos_id(tok, config.tokenizer.eos_token)
    parts = out.parts("clean")
    todo = [{"index": i, "path": p} for i, p in parts
            if not (out.is_file(f"{TOKENIZED}/{_part(i)}") and out.is_file(f"{TOKEN_COUNTS}/{_part(i)}"))]
    log.info("tokens: %d of %d clean parts to tokenize", len(todo), len(parts))
    _per_file(config, todo, _tokenize_file, (out.location, config.tokenizer.eos_token))
    splits = {s: SplitInfo() for s in ("train", "validation")}
    # One groupby over the per-file totals gives both: the stored tokens per split and, per language,
    # the characters per token (documents counted once, EOS excluded).
    stored = {s: 0 for s in splits}
    chars: Counter[str] = Counter()
    toks: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    totals = _read_parquet(out, TOKEN_COUNTS, TOKEN_COUNTS_SCHEMA.names)
    for row in totals.groupby(["split", "lang"], num_partitions=1).aggregate(
            Sum("documents"), Sum("nchars"), Sum("num_tokens"), Sum("stored")).iter_rows():
        lang, n = str(row["lang"]), int(row["sum(documents)"])
        stored[str(row["split"])] += int(row["sum(stored)"])
        chars[lang] += int(row["sum(nchars)"])
        docs[lang] += n
        toks[lang] += int(row["sum(num_tokens)"]) - n
    # Shards per split from the stored bytes (uint32 tokens), so a shard is about target_shard_bytes.
    num_shards = {s: max(1, math.ceil(4 * n / config.pack.target_shard_bytes)) for s, n in stored.items()}
    rows = _read_parquet(out, TOKENIZED, ["order", "source", "split", "copies", "ids"])
    rows = rows.map_batches(_assign_shard, batch_format="pyarrow",
                            fn_kwargs={"seed": config.mix.seed, "num_shards": num_shards})
    packed = rows.groupby(["split", "shard"], num_partitions=_num_partitions(config)).map_groups(
        _pack_task, batch_format="pyarrow",
        fn_kwargs={"location": out.location, "seq_len": config.pack.seq_len, "eos": eos})
    tokens_per_source: Counter[str] = Counter()
    padding = 0
    for r in sorted(packed.iter_rows(), key=lambda r: (r["split"], r["shard"])):  # one row per shard
        if not r["path"]:
            continue
        splits[r["split"]].files.append(ShardInfo(r["path"], int(r["num_sequences"])))
        if r["split"] == "train":
            tokens_per_source.update(json.loads(r["tokens_per_source"]))
        padding += int(r["num_padding"])
    cpt = {lang: round(chars[lang] / max(toks[lang], 1), 4) for lang in sorted(chars)}
    total_train = sum(tokens_per_source.values()) or 1
    stats = _read_json(out, "stats.json")
    weights = {s.name: s.weight for s in config.sources}
    for s in stats["by_source"]:  # sources named by the records themselves (a ``source`` field)
        weights.setdefault(s, None)
    wsum = sum(w for w in weights.values() if w)

    def target(w: float | None) -> float | None:
        return w / wsum if w and wsum else None

    sources = {
        s: {"weight": weights[s], "target_proportion": target(weights[s]),
            "train_tokens": tokens_per_source.get(s, 0),
            "realized_proportion": round(tokens_per_source.get(s, 0) / total_train, 6)}
        for s in weights
    }
    manifest = Manifest(seq_len=config.pack.seq_len, vocab_size=tok.get_vocab_size(),
                        tokenizer_sha256=_sha256(tok_json), splits=splits, eos_token_id=eos, sources=sources,
                        extra={"tokenizer": "tokenizer.json", "config_fingerprint": config.fingerprint(),
                               "chars_per_token": cpt, "num_padding_tokens": padding,
                               "packing": "documents joined by EOS, concatenated, cut into seq_len+1 rows"})
    stats["tokenize"] = {"chars_per_token": cpt, "documents": dict(sorted(docs.items())),
                         "tokens": dict(sorted(toks.items())),
                         "train_sequences": splits["train"].num_sequences,
                         "validation_sequences": splits["validation"].num_sequences,
                         "shards": {s: len(splits[s].files) for s in splits},
                         "realized_source_proportions": {s: v["realized_proportion"] for s, v in sources.items()}}
    _write_json(out, "stats.json", stats)
    write_manifest(out.path(), manifest, filesystem=out.fs)


def prepare_data(config: DataConfig) -> Path | str:
    """Run the whole data job; returns the output directory (a Path, or the URI for a remote output).
    Idempotent: a finished directory with the same config returns at once; a partial one (after a crash)
    is completed, redoing only unfinished files. Uses the running Ray cluster if there is one, else starts
    (and stops) a local one."""
    out = Output(config.output)
    fp = config.fingerprint()
    record = f"{WORK}/config.json"
    for marker in (SUCCESS, record):
        if out.is_file(marker):
            prev = _read_json(out, marker).get("fingerprint")
            if prev != fp:
                raise ConfigError(f"output {out.location!r} holds a run of a different config (fingerprint {prev}, "
                                  f"this one {fp}); choose a new --output or delete the directory")
    result = Path(out.location) if out.local else out.location
    if out.is_file(SUCCESS):
        log.info("data in %s is complete; nothing to do", out)
        return result
    if not out.is_file(record):
        _write_json(out, record, {"fingerprint": fp, "config": to_dict(config)})
    started = _ensure_ray()
    try:
        t0 = time.time()
        timings = {}
        for name, stage in (("records", _stage_records), ("clean", _stage_clean),
                            ("tokenizer", _stage_tokenizer), ("tokens", _stage_tokens)):
            t = time.time()
            stage(config, out)
            timings[name] = round(time.time() - t, 2)
        _write_json(out, SUCCESS, {"fingerprint": fp, "seconds": round(time.time() - t0, 2), "stage_seconds": timings})
    finally:
        if started:
            ray.shutdown()
    return result

"""The data job: raw files -> clean/ + rejected/ + stats.json -> tokenizer.json -> tokens/ + manifest.json.

``prepare_data(config)`` runs four stages on Ray; each leaves its output under a final name only when it is
complete (temp dir + rename, or an atomic file), and a rerun skips every stage whose output exists
(datatrove's completion markers, STYLE.md rule 8). A finished directory carries ``_SUCCESS`` with the
config fingerprint, so a rerun of the same command returns at once, and a rerun after a crash redoes only
the unfinished stage, with the same result (all decisions are functions of the document ``order``).

1. records (Ray Data, streaming): read files -> StepChain (normalize, lang, quality, toxic, domain,
   dedup signature) in an actor pool -> ``_work/records/`` Parquet, every input record with its reason.
2. clean: exact + MinHash-LSH duplicates decided over the survivors' (order, hash, signature) table;
   then per records file, a Ray task applies dedup, the validation split and mixing and writes
   ``clean/part-i.parquet`` and ``rejected/part-i.parquet``; ``stats.json`` is counted from the reasons.
3. tokenizer: train a byte-level BPE on the clean train split, or copy the given tokenizer.json.
4. tokens (Ray Data): tokenize clean/ in an actor pool -> ``_work/tokenized/``; one Ray task per
   (split, shard) packs and writes ``tokens/{split}/part-XXXXX.arrow``; then ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from aquila_ray.config.base import to_dict
from aquila_ray.errors import ConfigError, DataError
from aquila_ray.train.shards import Manifest, ShardInfo, SplitInfo, write_manifest
from data_pipeline.config import DataConfig
from data_pipeline.dedup import find_duplicates
from data_pipeline.mixing import assign_split, copies_for, mixing_rates, unit_hash
from data_pipeline.packing import pack_shard
from data_pipeline.readers import plan_inputs, read_files_batch
from data_pipeline.steps import STEP_ORDER, StepChain
from data_pipeline.tokenizer import Tokenize, eos_id, file_sha256, load_tokenizer, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

WORK = "_work"
SUCCESS = "_SUCCESS"


# ------------------------------------------------------------------------------------------------ schemas
def records_schema(num_perm: int) -> pa.Schema:
    return pa.schema([
        ("order", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("url", pa.string()),
        ("text", pa.large_string()), ("nbytes", pa.int64()), ("nchars", pa.int64()), ("lang", pa.string()),
        ("lang_score", pa.float64()), ("reason", pa.string()), ("exact_hash", pa.int64()),
        ("signature", pa.list_(pa.uint32(), num_perm)),
    ])


CLEAN_SCHEMA = pa.schema([
    ("order", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("lang", pa.string()),
    ("split", pa.string()), ("copies", pa.int32()), ("url", pa.string()), ("text", pa.large_string()),
])
REJECTED_SCHEMA = pa.schema([
    ("order", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("lang", pa.string()),
    ("reason", pa.string()), ("nbytes", pa.int64()), ("url", pa.string()), ("text", pa.large_string()),
])
TOKENIZED_SCHEMA = pa.schema([
    ("order", pa.int64()), ("source", pa.string()), ("lang", pa.string()), ("split", pa.string()),
    ("shard", pa.int32()), ("copies", pa.int32()), ("nchars", pa.int64()), ("num_tokens", pa.int64()),
    ("ids", pa.list_(pa.uint32())),
])


class _ChainUDF:
    """Ray Data actor: the StepChain, output as an Arrow table with an explicit schema."""

    def __init__(self, config: DataConfig) -> None:
        self.chain = StepChain(config)
        self.schema = records_schema(_num_perm(config))

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        out = self.chain(batch)
        out["nchars"] = np.asarray([len(t) for t in out["text"]], dtype=np.int64)
        sig = np.ascontiguousarray(out.pop("signature"), dtype=np.uint32)
        width = self.schema.field("signature").type.list_size
        arrays = {k: pa.array(list(v) if v.dtype == object else v, type=self.schema.field(k).type)
                  for k, v in out.items()}
        arrays["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1), pa.uint32()), width)
        return pa.table([arrays[f.name] for f in self.schema], schema=self.schema)


class _TokenizeUDF:
    """Ray Data actor: Tokenize, output as an Arrow table (ids as list<uint32>)."""

    def __init__(self, tokenizer_path: str, eos_token: str, seed: int, num_shards: dict[str, int]) -> None:
        self.tokenize = Tokenize(tokenizer_path, eos_token)
        self.seed = seed
        self.num_shards = num_shards

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        out = self.tokenize(batch)
        shards = [int(unit_hash(self.seed, int(o), "shard") * self.num_shards[str(s)])
                  for o, s in zip(out["order"], out["split"], strict=True)]
        ids = list(out["ids"])
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum([a.size for a in ids], out=offsets[1:])
        values = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)
        cols = {
            "order": pa.array(out["order"], pa.int64()), "source": pa.array(list(out["source"]), pa.string()),
            "lang": pa.array(list(out["lang"]), pa.string()), "split": pa.array(list(out["split"]), pa.string()),
            "shard": pa.array(shards, pa.int32()), "copies": pa.array(out["copies"], pa.int32()),
            "nchars": pa.array(out["nchars"], pa.int64()), "num_tokens": pa.array(out["num_tokens"], pa.int64()),
            "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.uint32())),
        }
        return pa.table([cols[f.name] for f in TOKENIZED_SCHEMA], schema=TOKENIZED_SCHEMA)


_UDF_CACHE: dict[tuple[str, str], Any] = {}


def _cached(cls: type, key: str, *args: Any) -> Any:
    """One instance of a UDF class per worker process (the task-based counterpart of an actor's state)."""
    k = (cls.__name__, key)
    if k not in _UDF_CACHE:
        _UDF_CACHE[k] = cls(*args)
    return _UDF_CACHE[k]


def _chain_task(batch: dict[str, Any], config: DataConfig) -> pa.Table:
    return _cached(_ChainUDF, config.fingerprint(), config)(batch)


def _tokenize_task(batch: dict[str, Any], tokenizer_path: str, eos_token: str, seed: int,
                   num_shards: dict[str, int]) -> pa.Table:
    key = f"{tokenizer_path}:{file_sha256(tokenizer_path)[:16]}:{seed}:{sorted(num_shards.items())}"
    return _cached(_TokenizeUDF, key, tokenizer_path, eos_token, seed, num_shards)(batch)


def _map(ds: Any, config: DataConfig, cls: type, task_fn: Any, args: tuple[Any, ...], batch_size: int) -> Any:
    """map_batches either as tasks (default: no actor start-up, the UDF object cached per worker process) or
    as an actor pool (``ray_compute: actors``: state pinned to long-lived actors, better on big clusters)."""
    import ray

    if config.ray_compute == "actors":
        return ds.map_batches(cls, fn_constructor_args=args, batch_size=batch_size, num_cpus=1,
                              compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_num_workers(config)))
    return ds.map_batches(task_fn, fn_args=args, batch_size=batch_size, num_cpus=1)


def _num_perm(config: DataConfig) -> int:
    return config.dedup.num_bands * config.dedup.rows_per_band if config.dedup.fuzzy else 1


# ------------------------------------------------------------------------------------------------ helpers
def _ensure_ray() -> bool:
    """Start a local Ray if none is running (returns True when we started it)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init()
    return True


def _num_workers(config: DataConfig) -> int:
    import ray

    if config.num_workers:
        return config.num_workers
    return max(1, int(ray.available_resources().get("CPU", 1)))


def _fresh_tmp(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False))
    os.replace(tmp, path)


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


# ------------------------------------------------------------------------------------------------ stages
def _stage_records(config: DataConfig, out: Path) -> None:
    import ray

    final = out / WORK / "records"
    if final.is_dir():
        return
    files = plan_inputs(config)
    tmp = _fresh_tmp(final)
    items = [dataclasses.asdict(f) for f in files]
    ds: Any = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(read_files_batch, batch_size=1, fn_kwargs={"max_doc_bytes": config.max_doc_bytes})
    ds = _map(ds, config, _ChainUDF, _chain_task, (config,), batch_size=256)
    ds.write_parquet(str(tmp))
    os.replace(tmp, final)


def _finalize_file(path: str, index: int, out: str, dups: dict[int, str], rates: dict[str, float],
                   config: DataConfig) -> dict[str, Any]:
    """Apply dedup, split and mixing to one records file; write clean/ and rejected/ parts for it."""
    t = pq.read_table(path, columns=["order", "id", "source", "url", "text", "nbytes", "lang", "reason"]).to_pydict()
    clean: dict[str, list[Any]] = {f.name: [] for f in CLEAN_SCHEMA}
    rej: dict[str, list[Any]] = {f.name: [] for f in REJECTED_SCHEMA}
    counts: Counter[tuple[str, str, str]] = Counter()
    seed, vf = config.mix.seed, config.mix.validation_fraction
    for i, order in enumerate(t["order"]):
        reason = t["reason"][i] or dups.get(order, "")
        split, copies = "", 1
        if not reason:
            split = assign_split(order, seed, vf)
            if split == "train":
                copies = copies_for(order, seed, rates.get(t["source"][i], 1.0))
                if copies == 0:
                    reason = "mix.downsampled"
        counts[(t["source"][i], t["lang"][i], reason)] += 1
        if reason:
            for k in ("order", "id", "source", "lang", "reason", "nbytes", "url"):
                rej[k].append(reason if k == "reason" else t[k][i])
            rej["text"].append(t["text"][i][:config.rejected_text_chars])
        else:
            for k in ("order", "id", "source", "lang", "url", "text"):
                clean[k].append(t[k][i])
            clean["split"].append(split)
            clean["copies"].append(copies)
    name = f"part-{index:05d}.parquet"
    for sub, data, schema in (("clean", clean, CLEAN_SCHEMA), ("rejected", rej, REJECTED_SCHEMA)):
        d = Path(out) / sub
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (name + f".tmp-{os.getpid()}")
        pq.write_table(pa.table(data, schema=schema), tmp)
        os.replace(tmp, d / name)
    return {"counts": [[s, lang, r, n] for (s, lang, r), n in counts.items()]}


def _stage_clean(config: DataConfig, out: Path) -> None:
    import ray

    if (out / "stats.json").is_file() and (out / "clean").is_dir() and (out / "rejected").is_dir():
        return
    records = out / WORK / "records"
    files = sorted(str(p) for p in records.glob("*.parquet"))
    dataset = pads.dataset(files, format="parquet")
    alive = dataset.to_table(columns=["order", "source", "nchars", "exact_hash", "signature"],
                             filter=pads.field("reason") == "")
    order = alive.column("order").to_numpy()
    sig = None
    if config.dedup.fuzzy and alive.num_rows:
        sig = alive.column("signature").combine_chunks().flatten().to_numpy().reshape(alive.num_rows, -1)
    dups = find_duplicates(order, alive.column("exact_hash").to_numpy(), sig, config.dedup)
    # Mixing rates from the natural size (characters) of each source's train documents.
    chars: Counter[str] = Counter({s.name: 0 for s in config.sources})
    for o, s, n in zip(order.tolist(), alive.column("source").to_pylist(), alive.column("nchars").to_pylist(),
                       strict=True):
        if o not in dups and assign_split(o, config.mix.seed, config.mix.validation_fraction) == "train":
            chars[s] += n
    rates = mixing_rates(dict(chars), {s.name: s.weight for s in config.sources})
    for sub in ("clean", "rejected"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    remote = ray.remote(num_cpus=1)(_finalize_file)
    dups_ref = ray.put(dups)
    results = ray.get([remote.remote(f, i, str(out), dups_ref, rates, config) for i, f in enumerate(files)])
    counts: Counter[tuple[str, str, str]] = Counter()
    for r in results:
        for s, lang, reason, n in r["counts"]:
            counts[(s, lang, reason)] += n
    stats = build_stats(counts)
    stats["mixing"] = {"source_chars": dict(chars), "rates": rates,
                       "weights": {s.name: s.weight for s in config.sources}}
    _write_json(out / "stats.json", stats)


def build_stats(counts: Counter[tuple[str, str, str]]) -> dict[str, Any]:
    """stats.json from (source, lang, reason) -> documents. Per step: in, kept, dropped per reason, in
    the order steps run; totals, per source and per language; and the check in == kept + dropped + invalid."""
    by_step: dict[str, Counter[str]] = {s: Counter() for s in STEP_ORDER}
    total = sum(counts.values())
    kept = sum(n for (_, _, r), n in counts.items() if not r)
    for (_, _, reason), n in counts.items():
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
    }


def _stage_tokenizer(config: DataConfig, out: Path) -> None:
    path = out / "tokenizer.json"
    if path.is_file():
        return
    if config.tokenizer.path:
        tok = load_tokenizer(config.tokenizer.path)
        eos_id(tok, config.tokenizer.eos_token)
        tmp = path.with_name("tokenizer.json.tmp")
        shutil.copyfile(config.tokenizer.path, tmp)
        os.replace(tmp, path)
        return
    budget = config.tokenizer.max_train_chars

    def texts() -> Any:
        used = 0
        for f in sorted((out / "clean").glob("*.parquet")):
            t = pq.read_table(f, columns=["text", "split"])
            for text, split in zip(t.column("text").to_pylist(), t.column("split").to_pylist(), strict=True):
                if split != "train":
                    continue
                yield text[: budget - used]
                used += min(len(text), budget - used)
                if used >= budget:
                    return

    tok = train_tokenizer(texts(), config.tokenizer)
    if tok.get_vocab_size() < 257:
        raise DataError(f"tokenizer trained on too little text (vocab {tok.get_vocab_size()}); "
                        f"is clean/ empty? See {out / 'stats.json'}")
    save_tokenizer(tok, path)


def _stage_tokens(config: DataConfig, out: Path) -> None:
    import ray

    if (out / "manifest.json").is_file():
        return
    tok_path = out / "tokenizer.json"
    tok = load_tokenizer(tok_path)
    eos = eos_id(tok, config.tokenizer.eos_token)
    num_shards = {"train": config.pack.num_train_shards, "validation": config.pack.num_validation_shards}
    final = out / WORK / "tokenized"
    if not final.is_dir():
        tmp = _fresh_tmp(final)
        columns = ["order", "source", "lang", "split", "copies", "text"]
        ds: Any = ray.data.read_parquet(str(out / "clean"), columns=columns)
        ds = _map(ds, config, _TokenizeUDF, _tokenize_task,
                  (str(tok_path), config.tokenizer.eos_token, config.mix.seed, num_shards), batch_size=512)
        ds.write_parquet(str(tmp))
        os.replace(tmp, final)
    remote = ray.remote(num_cpus=1)(pack_shard)
    jobs = []
    for split, n in num_shards.items():
        for shard in range(n):
            rel = f"tokens/{split}/part-{shard:05d}.arrow"
            jobs.append(remote.remote(str(final), split, shard, config.pack.seq_len, eos, str(out / rel)))
    results = ray.get(jobs)
    splits = {s: SplitInfo() for s in num_shards}
    tokens_per_source: Counter[str] = Counter()
    padding = 0
    for r in sorted(results, key=lambda r: (r["split"], r["shard"])):
        if r["path"] is None:
            continue
        splits[r["split"]].files.append(ShardInfo(str(Path(r["path"]).relative_to(out)), r["num_sequences"]))
        if r["split"] == "train":
            tokens_per_source.update(r["tokens_per_source"])
        padding += r["num_padding"]
    # Characters per token, per language (documents counted once, EOS excluded).
    tt = pads.dataset(str(final), format="parquet").to_table(columns=["lang", "nchars", "num_tokens"]).to_pydict()
    chars: Counter[str] = Counter()
    toks: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    for lang, nc, nt in zip(tt["lang"], tt["nchars"], tt["num_tokens"], strict=True):
        chars[lang] += nc
        toks[lang] += nt - 1
        docs[lang] += 1
    cpt = {lang: round(chars[lang] / max(toks[lang], 1), 4) for lang in sorted(chars)}
    total_train = sum(tokens_per_source.values()) or 1
    weights = {s.name: s.weight for s in config.sources}
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
                        tokenizer_sha256=file_sha256(tok_path), splits=splits, eos_token_id=eos, sources=sources,
                        extra={"tokenizer": "tokenizer.json", "config_fingerprint": config.fingerprint(),
                               "chars_per_token": cpt, "num_padding_tokens": padding,
                               "packing": "documents joined by EOS, concatenated, cut into seq_len+1 rows"})
    stats = json.loads((out / "stats.json").read_text())
    stats["tokenize"] = {"chars_per_token": cpt, "documents": dict(docs), "tokens": dict(toks),
                         "train_sequences": splits["train"].num_sequences,
                         "validation_sequences": splits["validation"].num_sequences,
                         "realized_source_proportions": {s: v["realized_proportion"] for s, v in sources.items()}}
    _write_json(out / "stats.json", stats)
    write_manifest(out, manifest)


def prepare_data(config: DataConfig) -> Path:
    """Run the whole data job; returns the output directory. Idempotent: a finished directory with the same
    config returns at once; a partial one (after a crash) is completed. Uses the running Ray cluster if
    there is one, else starts (and stops) a local one."""
    out = Path(config.output).resolve()
    fp = config.fingerprint()
    done = out / SUCCESS
    record = out / WORK / "config.json"
    for marker in (done, record):
        if marker.is_file():
            prev = json.loads(marker.read_text()).get("fingerprint")
            if prev != fp:
                raise ConfigError(f"output {str(out)!r} holds a run of a different config (fingerprint {prev}, "
                                  f"this one {fp}); choose a new --output or delete the directory")
    if done.is_file():
        log.info("data in %s is complete; nothing to do", out)
        return out
    (out / WORK).mkdir(parents=True, exist_ok=True)
    _write_json(record, {"fingerprint": fp, "config": to_dict(config)})
    started = _ensure_ray()
    try:
        t0 = time.time()
        timings = {}
        for name, stage in (("records", _stage_records), ("clean", _stage_clean),
                            ("tokenizer", _stage_tokenizer), ("tokens", _stage_tokens)):
            t = time.time()
            stage(config, out)
            timings[name] = round(time.time() - t, 2)
        _write_json(done, {"fingerprint": fp, "seconds": round(time.time() - t0, 2), "stage_seconds": timings})
    finally:
        if started:
            import ray

            ray.shutdown()
    return out

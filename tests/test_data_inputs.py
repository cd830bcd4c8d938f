"""Inputs through pyarrow filesystems and per-record sources (no Ray), and the stratified tokenizer sample
(Ray Data on a local cluster, ``ray`` marker)."""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aquila_ray.errors import ConfigError
from data_pipeline import synthetic
from data_pipeline.config import DataConfig, MixConfig, SourceConfig, TokenizerConfig
from data_pipeline.mixing import unit_hash
from data_pipeline.readers import InputFile, expand_pattern, plan_inputs, read_file, valid_source_name
from data_pipeline.tokenizer import TokenizerSample, sample_for_tokenizer, split_budget, train_tokenizer


def records(files: list[InputFile], max_doc_bytes: int = 10_000) -> list[tuple]:
    out = []
    for f in files:
        for b in read_file(f, max_doc_bytes):
            out += list(zip(b["order"], b["id"], b["source"], b["url"], b["text"], b["reason"], strict=True))
    return out


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """web/2024/a.jsonl.gz (gzip), web/2024/deep/b.jsonl, web/c.parquet, web/p.html, web/.hidden/x.jsonl."""
    (tmp_path / "web" / "2024" / "deep").mkdir(parents=True)
    (tmp_path / "web" / ".hidden").mkdir()
    rows = [{"id": "a0", "text": "alpha", "source": "wiki_zh"}, {"text": "beta", "source": "a/b"},
            {"text": "gamma", "source": 7}, {"text": "delta", "source": ""}, {"text": "eps", "source": "x y"},
            {"text": "zeta", "url": "https://github.com/x", "source": "s" * 129}, {"text": "eta", "source": None}]
    with gzip.open(tmp_path / "web" / "2024" / "a.jsonl.gz", "wb") as fh:
        fh.write(b"\n".join(json.dumps(r).encode() for r in rows) + b"\n{broken\n")
    (tmp_path / "web" / "2024" / "deep" / "b.jsonl").write_text(json.dumps({"text": "theta", "source": "books"}))
    pq.write_table(pa.table({"text": ["iota", "kappa", None], "source": ["code", None, "code"],
                             "id": ["p0", None, "p2"]}), tmp_path / "web" / "c.parquet")
    (tmp_path / "web" / "p.html").write_text("<p>lambda</p>")
    (tmp_path / "web" / ".hidden" / "x.jsonl").write_text(json.dumps({"text": "hidden"}))
    return tmp_path


def config_of(*paths: str, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig("web", list(paths), **kw)])


def test_file_uri_reads_the_same_records_as_the_local_path(tree: Path) -> None:
    local = plan_inputs(config_of(f"{tree}/web/**/*.jsonl*", f"{tree}/web/*.parquet", f"{tree}/web/p.html"))
    uri = plan_inputs(config_of(f"file://{tree}/web/**/*.jsonl*", f"file://{tree}/web/*.parquet",
                                f"file://{tree}/web/p.html"))
    assert [f.path for f in local] == [f"{tree}/web/2024/a.jsonl.gz", f"{tree}/web/2024/deep/b.jsonl",
                                       f"{tree}/web/c.parquet", f"{tree}/web/p.html"]
    assert [f.path for f in uri] == [f"file://{p.path}" for p in local]
    assert [f.format for f in uri] == ["jsonl", "jsonl", "parquet", "html"]
    assert records(uri) == records(local)
    texts = [r[4] for r in records(local)]
    assert texts == ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "", "theta", "iota", "kappa", "",
                     "lambda"]


def test_globs_under_a_uri_match_glob_glob(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import glob

    monkeypatch.chdir(tree)
    for pattern in ["web/**/*.jsonl", "web/**", "web/*", "web/2024/*.jsonl.gz", "web/.hidden/*", "**/b.jsonl",
                    "web/202?/[ab].jsonl*", "web/c.parquet", "web/none/*.jsonl"]:
        expected = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        assert expand_pattern(pattern) == expected, pattern
        assert expand_pattern(f"file://{tree}/{pattern}") == [f"file://{tree}/{p}" for p in expected], pattern
    assert expand_pattern(f"file://{tree}/web/**/*.jsonl") == [f"file://{tree}/web/2024/deep/b.jsonl"]


def test_missing_inputs_and_unknown_schemes(tree: Path) -> None:
    files = plan_inputs(config_of(f"file://{tree}/none/*.jsonl", f"file://{tree}/web/c.parquet"))
    assert [(f.path, f.missing, f.file_index) for f in files] == [
        (f"file://{tree}/none/*.jsonl", True, 0), (f"file://{tree}/web/c.parquet", False, 1)]
    assert [r[5] for r in records(files[:1])] == ["read.missing_file"]
    gone = InputFile(f"file://{tree}/web/gone.jsonl", "web", 2, "jsonl")  # listed, then deleted
    assert [r[5] for r in records([gone])] == ["read.unreadable_file"]
    with pytest.raises(ConfigError, match=r"input 'nofs://b/\*.jsonl' is not a location pyarrow can read"):
        plan_inputs(config_of("nofs://b/*.jsonl"))


def test_per_record_source_is_honoured_when_valid(tree: Path) -> None:
    files = plan_inputs(config_of(f"file://{tree}/web/**/*.jsonl*", f"{tree}/web/*.parquet"))
    got = [(r[4], r[2]) for r in records(files)]
    assert got == [("alpha", "wiki_zh"), ("beta", "web"), ("gamma", "web"), ("delta", "web"), ("eps", "web"),
                   ("zeta", "web"), ("eta", "web"), ("", "web"), ("theta", "books"), ("iota", "code"),
                   ("kappa", "web"), ("", "code")]
    ids = [r[1] for r in records(files)]
    assert ids[:3] == ["a0", "web/a.jsonl.gz:1", "web/a.jsonl.gz:2"] and ids[-3:] == ["p0", "web/c.parquet:1", "p2"]
    off = plan_inputs(config_of(f"{tree}/web/**/*.jsonl*", f"{tree}/web/*.parquet", source_field=None))
    assert {r[2] for r in records(off)} == {"web"}
    other = plan_inputs(config_of(f"{tree}/web/*.parquet", source_field="id"))  # any field can name sources
    assert [r[2] for r in records(other)] == ["p0", "web", "p2"]
    assert [valid_source_name(v) for v in ["wiki_zh", "维基", "a/b", "", " a", "a\tb", 3, None, "s" * 128]] == [
        True, True, False, False, False, False, False, False, True]
    with pytest.raises(ConfigError, match=r"sources\[web\].source_field='' is not valid; expected a field name"):
        SourceConfig("web", ["x"], source_field="")


def test_the_records_stage_passes_every_input_field_to_its_task(tree: Path) -> None:
    """The records task rebuilds each InputFile from the row Ray Data hands it: a field lost on the way (the
    source_field once was) silently changes the records."""
    import dataclasses

    from data_pipeline.run import _records_file

    for source_field, want in (("id", ["p0", "web", "p2"]), (None, ["web"] * 3)):
        cfg = config_of(f"{tree}/web/*.parquet", source_field=source_field)
        (f,) = plan_inputs(cfg)
        out = tree / f"records-{source_field}"
        assert _records_file(dataclasses.asdict(f), cfg, str(out)) == 3
        assert pq.read_table(out / "_work/records/part-00000.parquet").column("source").to_pylist() == want


# ------------------------------------------------------------------------------------------------ tokenizer sample
def test_split_budget_proportional_and_equal() -> None:
    chars = {"a": 100, "b": 300, "c": 600}
    assert split_budget(500, chars, "proportional") == {"a": 50.0, "b": 150.0, "c": 300.0}
    assert split_budget(5000, chars, "proportional") == {"a": 100.0, "b": 300.0, "c": 600.0}
    assert split_budget(500, chars, "equal") == {"a": 100.0, "b": 200.0, "c": 200.0}
    assert split_budget(900, chars, "equal") == {"a": 100.0, "b": 300.0, "c": 500.0}


def make_clean(root: Path) -> dict[int, dict]:
    """A clean/ of ~90% en characters (two sources) and ~10% zh, in three files, with a validation split."""
    rng = random.Random(0)
    rows = []
    for source, lang, n, make in [("en_web", "en", 360, lambda: synthetic.en_doc(rng, rng.randint(40, 160))),
                                  ("en_books", "en", 120, lambda: synthetic.en_doc(rng, rng.randint(40, 160))),
                                  ("zh_web", "zh", 150, lambda: synthetic.zh_doc(rng, rng.randint(100, 300)))]:
        for _ in range(n):
            order = len(rows) * 7 + 3
            rows.append({"order": order, "id": str(order), "source": source, "lang": lang,
                         "split": "validation" if order % 10 == 0 else "train", "copies": 1, "url": "",
                         "text": make()})
    root.mkdir()
    rng.shuffle(rows)
    for i in range(3):
        part = rows[i::3]
        pq.write_table(pa.Table.from_pylist(part), root / f"part-{i:05d}.parquet")
    return {r["order"]: r for r in rows}


def reference(rows: dict[int, dict], quotas: dict[tuple[str, str], float], seed: int) -> set[int]:
    """The sample by its definition: per stratum, train documents by increasing hash until the quota."""
    out = set()
    for key, quota in quotas.items():
        docs = sorted((unit_hash(seed, o, "tokenizer"), o) for o, r in rows.items()
                      if (r["lang"], r["source"]) == key and r["split"] == "train")
        used = 0
        for _, o in docs:
            if used >= quota:
                break
            out.add(o)
            used += len(rows[o]["text"])
    return out


@pytest.mark.ray
def test_tokenizer_sample_is_balanced_reproducible_and_reported(ray_cluster, tmp_path: Path) -> None:
    import ray

    rows = make_clean(tmp_path / "clean")
    chars = Counter()
    for r in rows.values():
        if r["split"] == "train":
            chars[r["lang"]] += len(r["text"])
    assert chars["en"] > 8 * chars["zh"]  # the corpus is ~90% en
    budget = 10_000
    assert chars["zh"] > 2 * budget
    cfg = DataConfig(sources=[SourceConfig("x", ["x"])], mix=MixConfig(seed=5),
                     tokenizer=TokenizerConfig(vocab_size=600, sample_chars_per_lang=budget))
    by_text = {r["text"]: o for o, r in rows.items()}

    def draw(ds) -> tuple[TokenizerSample, list[int]]:
        sample = sample_for_tokenizer(ds, cfg)
        return sample, sorted(by_text[t] for t in sample.texts())

    sample, got = draw(ray.data.read_parquet(str(tmp_path / "clean")))
    stats = sample.stats()
    # Each language gets its budget, exceeded by less than one document per stratum.
    longest = Counter()
    for r in rows.values():
        key = (r["lang"], r["source"])
        longest[key] = max(longest[key], len(r["text"]))
    for s in stats["strata"]:
        key = (s["lang"], s["source"])
        assert s["quota"] <= s["chars"] < s["quota"] + longest[key], s
    for lang in ("en", "zh"):
        g = stats["by_lang"][lang]
        assert g["budget"] == budget and g["available_chars"] == chars[lang]
        assert budget <= g["chars"] < budget + 2 * max(longest.values())
    en_quota = {s["source"]: s["quota"] for s in stats["strata"] if s["lang"] == "en"}
    en_avail = {s["source"]: s["available_chars"] for s in stats["strata"] if s["lang"] == "en"}
    assert abs(en_quota["en_web"] / en_quota["en_books"] - en_avail["en_web"] / en_avail["en_books"]) < 1e-3
    # Exactly the documents the definition picks, every one from the train split, and the stats count them.
    quotas = {(s.lang, s.source): s.quota for s in sample.strata}
    assert set(got) == reference(rows, quotas, seed=5) and len(got) == len(set(got)) == stats["docs"]
    assert all(rows[o]["split"] == "train" for o in got)
    for lang in ("en", "zh"):
        lang_docs = [o for o in got if rows[o]["lang"] == lang]
        assert stats["by_lang"][lang]["docs"] == len(lang_docs)
        assert stats["by_lang"][lang]["chars"] == sum(len(rows[o]["text"]) for o in lang_docs)
        assert stats["by_lang"][lang]["share"] == round(stats["by_lang"][lang]["chars"] / stats["chars"], 6)
    assert 0.4 < stats["by_lang"]["zh"]["share"] < 0.6  # balanced, where the corpus is ~10% zh
    # Reproducible: over a different block layout, with nchars precomputed, the same documents.
    relaid = ray.data.read_parquet(str(tmp_path / "clean")).repartition(7).map_batches(
        lambda t: t.append_column("nchars", pa.array([len(x) for x in t.column("text").to_pylist()], pa.int64())),
        batch_format="pyarrow")
    again, got2 = draw(relaid)
    assert got2 == got and again.stats() == stats
    # The trained tokenizer sees the sample; a budget above the corpus takes every train document.
    tok = train_tokenizer((rows[o]["text"] for o in got), cfg.tokenizer)
    assert tok.get_vocab_size() == 600
    cfg.tokenizer.sample_chars_by_lang = {"en": 10**9, "zh": 10**9}
    everything = sample_for_tokenizer(ray.data.read_parquet(str(tmp_path / "clean")), cfg)
    assert everything.stats()["docs"] == sum(r["split"] == "train" for r in rows.values())
    assert all(s.cut is None for s in everything.strata)

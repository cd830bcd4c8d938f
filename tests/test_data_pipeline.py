"""The whole data job on a local Ray cluster over a planted corpus: exact counts, shards that decode back to
the kept text, a no-op rerun, and a crash in the middle that a rerun finishes with the same result."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from aquila_ray.errors import ConfigError
from aquila_ray.train.shards import read_manifest, read_token_shard
from data_pipeline.config import load_data_config
from data_pipeline.run import prepare_data
from data_pipeline.synthetic import Planted, make_planted_corpus

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Planted, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return make_planted_corpus(root, seed=0, big_doc_bytes=20_000_000), root


def config_for(planted: Planted, out: Path, *extra: str):
    return load_data_config(None, [f"domain.blocked_domains=[{planted.blocked_domain}]", "tokenizer.vocab_size=600",
                                   "pack.seq_len=32", "mix.validation_fraction=0.1", "language.min_score=0.5",
                                   *extra],
                            inputs=planted.inputs, output=str(out))


@pytest.fixture(scope="module")
def run(ray_local, planted, tmp_path_factory) -> tuple[Planted, Path]:
    p, _ = planted
    out = tmp_path_factory.mktemp("out") / "data"
    prepare_data(config_for(p, out))
    return p, out


def test_stats_match_planted_counts(run) -> None:
    p, out = run
    stats = json.loads((out / "stats.json").read_text())
    t = stats["total"]
    assert t["in"] == p.total and t["kept"] == p.kept
    assert t["in"] == t["kept"] + t["dropped"] + t["invalid"] and stats["balanced"]
    found = {}
    for step in stats["steps"]:
        found.update(step.get("dropped", {}))
        found.update(step.get("invalid", {}))
    assert found == p.reasons
    assert {k: v["kept"] for k, v in stats["by_lang"].items() if v["kept"]} == p.kept_by_lang
    assert stats["by_source"]["lost"] == {"in": 1, "kept": 0, "dropped": {}, "invalid": {"read.missing_file": 1}}
    assert set(stats["tokenize"]["chars_per_token"]) == {"en", "zh"}


def test_rejected_holds_every_drop_with_its_reason(run) -> None:
    p, out = run
    rej = pq.read_table(out / "rejected").to_pydict()
    reasons: dict[str, int] = {}
    for r in rej["reason"]:
        reasons[r] = reasons.get(r, 0) + 1
    assert reasons == p.reasons
    huge = rej["nbytes"][rej["reason"].index("read.too_large")]
    assert huge > 10_000_000 and max(len(t) for t in rej["text"]) <= 2000
    clean = pq.read_table(out / "clean")
    assert clean.num_rows == p.kept
    assert set(clean.column_names) >= {"id", "source", "lang", "text", "split"}


def test_shards_decode_back_to_kept_text(run) -> None:
    _, out = run
    m = read_manifest(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert m.vocab_size == tok.get_vocab_size() and m.eos_token_id == tok.token_to_id("<|endoftext|>")
    clean = pq.read_table(out / "clean").to_pydict()
    for split in ("train", "validation"):
        docs = []
        for path in m.shard_paths(split):
            rows = read_token_shard(path)
            assert rows.dtype == np.uint32 and rows.shape[1] == m.seq_len + 1
            stream = rows.reshape(-1).tolist()
            cut = [i for i, t in enumerate(stream) if t == m.eos_token_id]
            starts = [0] + [i + 1 for i in cut]
            docs += [tok.decode(stream[a:b]) for a, b in zip(starts, cut, strict=False) if b > a]
        expected = [t for t, s in zip(clean["text"], clean["split"], strict=True) if s == split]
        assert sorted(docs) == sorted(expected), split
        assert m.splits[split].num_sequences > 0
    props = {s: v["realized_proportion"] for s, v in m.sources.items()}
    assert abs(sum(props.values()) - 1.0) < 1e-4 and props["lost"] == 0.0


def test_rerun_is_a_noop(run) -> None:
    p, out = run
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    prepare_data(config_for(p, out))
    after = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    assert before == after


def test_crash_then_rerun_finishes_with_same_result(run, tmp_path: Path) -> None:
    p, out = run
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    # a crash after tokenization: no manifest, no shards, no success marker; a stale temp dir left behind
    for name in ("_SUCCESS", "manifest.json"):
        (copy / name).unlink()
    shutil.rmtree(copy / "tokens")
    (copy / "_work" / "tokenized.tmp").mkdir()
    prepare_data(config_for(p, copy))
    assert json.loads((copy / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())
    for a, b in zip(sorted((out / "tokens").rglob("*.arrow")), sorted((copy / "tokens").rglob("*.arrow")),
                    strict=True):
        assert np.array_equal(read_token_shard(a), read_token_shard(b))


def test_other_config_on_finished_output_is_refused(run) -> None:
    p, out = run
    with pytest.raises(ConfigError, match="holds a run of a different config"):
        prepare_data(config_for(p, out, "pack.seq_len=64"))


def test_mixing_weights_are_realized(ray_local, planted, tmp_path: Path) -> None:
    p, root = planted
    cfg = load_data_config(None, ["tokenizer.vocab_size=400", "pack.seq_len=32", "mix.validation_fraction=0.0"],
                           inputs=[f"en={root}/en/*.jsonl", f"zh={root}/zh.jsonl.gz"], output=str(tmp_path / "o"))
    cfg = dataclasses.replace(cfg, sources=[dataclasses.replace(cfg.sources[0], weight=1.0),
                                            dataclasses.replace(cfg.sources[1], weight=3.0)])
    out = prepare_data(cfg)
    m = read_manifest(out)
    assert m.sources["zh"]["target_proportion"] == 0.75
    stats = json.loads((out / "stats.json").read_text())
    chars = stats["mixing"]["source_chars"]
    assert stats["mixing"]["rates"]["zh"] == pytest.approx(0.75 * (chars["en"] + chars["zh"]) / chars["zh"])
    # token share follows the character share (chars per token differ per language, so only roughly)
    assert m.sources["zh"]["realized_proportion"] > 0.6

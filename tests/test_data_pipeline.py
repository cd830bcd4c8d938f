"""The whole data job on a local Ray cluster over a planted corpus: exact counts, shards that decode back to
the kept text, a no-op rerun, and a crash in the middle that a rerun finishes with the same result."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from aquila_ray.data.shards import read_manifest, read_token_shard
from aquila_ray.errors import ConfigError
from data_pipeline.config import load_data_config
from data_pipeline.run import prepare_data
from data_pipeline.synthetic import Planted, make_planted_corpus

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Planted, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return make_planted_corpus(root, seed=0, big_doc_bytes=20_000_000), root


def config_for(planted: Planted, out: Path, *extra: str):
    return load_data_config(None, [f"domain.blocked_domains=[{planted.blocked_domain}]", "tokenizer.vocab_size=600",
                                   "pack.seq_len=32", "mix.validation_fraction=0.1", "language.min_score=0.5",
                                   *extra],
                            inputs=planted.inputs, output=str(out))


class DriverRows:
    """Counts the rows that reach the driver through Ray Data's consuming calls (iter_rows, iter_batches,
    take*, to_pandas): what a per-document collection on the driver would have to go through."""

    CALLS = ("iter_rows", "iter_batches", "take", "take_all", "take_batch", "to_pandas")

    def __init__(self) -> None:
        self.rows = {"sample": 0, "other": 0}
        self.largest = 0
        self.in_sample = False
        self.depth = 0

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import ray.data

        import data_pipeline.run as run_module
        from data_pipeline.tokenizer import TokenizerSample

        for name in self.CALLS:
            mp.setattr(ray.data.Dataset, name, self._wrap(getattr(ray.data.Dataset, name)))
        sample_for_tokenizer, texts = run_module.sample_for_tokenizer, TokenizerSample.texts

        def sampling(*a, **k):
            self.in_sample = True
            try:
                return sample_for_tokenizer(*a, **k)
            finally:
                self.in_sample = False

        def sample_texts(sample, *a, **k):
            self.in_sample = True
            try:
                yield from texts(sample, *a, **k)
            finally:
                self.in_sample = False

        mp.setattr(run_module, "sample_for_tokenizer", sampling)
        mp.setattr(TokenizerSample, "texts", sample_texts)

    def _count(self, n: int) -> None:
        self.rows["sample" if self.in_sample else "other"] += n
        if not self.in_sample:
            self.largest = max(self.largest, n)

    def _wrap(self, fn):
        def size(x) -> int:
            if isinstance(x, dict):
                return len(next(iter(x.values()), []))
            return x.num_rows if hasattr(x, "num_rows") else len(x)

        def wrapped(ds, *a, **k):
            outer = self.depth == 0
            self.depth += 1
            try:
                result = fn(ds, *a, **k)
                if fn.__name__.startswith("iter_"):
                    return self._iterate(result, outer, size, fn.__name__ == "iter_rows")
                if outer:
                    self._count(1 if fn.__name__ == "take_batch" and not result else size(result))
                return result
            finally:
                self.depth -= 1

        return wrapped

    def _iterate(self, it, outer: bool, size, rows: bool):
        self.depth += 1
        try:
            for item in it:
                if outer:
                    self._count(1 if rows else size(item))
                yield item
        finally:
            self.depth -= 1


@pytest.fixture(scope="module")
def run(ray_cluster, planted, tmp_path_factory) -> tuple[Planted, Path]:
    p, _ = planted
    out = tmp_path_factory.mktemp("out") / "data"
    counter = DriverRows()
    with pytest.MonkeyPatch.context() as mp:
        counter.install(mp)
        prepare_data(config_for(p, out))
    (out.parent / "driver_rows.json").write_text(json.dumps({**counter.rows, "largest": counter.largest}))
    return p, out


def test_the_driver_reads_only_aggregates_and_the_tokenizer_sample(run) -> None:
    """Nothing per document reaches the driver except the tokenizer's sample (bounded by its budget):
    every other row is a group of a groupby (sources x languages x domains x reasons) or a token shard."""
    p, out = run
    seen = json.loads((out.parent / "driver_rows.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    kept = pq.read_table(out / "clean", columns=["source", "lang", "domain"]).to_pylist()
    dropped = pq.read_table(out / "rejected", columns=["source", "lang", "domain", "reason"]).to_pylist()
    groups = len({tuple(r.values()) for r in kept}) + len({tuple(r.values()) for r in dropped})
    shards = sum(stats["tokenize"]["shards"].values())
    # the stats groupby + mixing (one row per source) + token totals per (split, language) + token shards
    # + one row total per input file in each of the three per-file stages
    files = len(list((out / "_work" / "records").glob("part-*.parquet")))
    bound = groups + len(stats["by_source"]) + 2 * len(stats["by_lang"]) + shards + 3 * files
    assert 0 < seen["other"] <= bound < p.total, (seen, bound)
    assert seen["largest"] <= max(groups, shards)
    # the sample's rows: its strata's sizes, then its documents (the budget covers this small corpus: no
    # candidate pass)
    assert seen["sample"] == len(stats["tokenizer"]["strata"]) + stats["tokenizer"]["docs"]
    assert stats["tokenizer"]["docs"] > 0


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
    # a crash after tokenization: no manifest, no shards, no success marker; the half-written temp files of
    # a part and of a shard left behind (what a killed writer leaves), which the rerun must not read
    for name in ("_SUCCESS", "manifest.json"):
        (copy / name).unlink()
    shutil.rmtree(copy / "tokens")
    (copy / "_work" / "tokenized" / "part-00000.parquet.tmp-1-deadbeef").write_bytes(b"PAR1 half")
    (copy / "tokens" / "train").mkdir(parents=True)
    (copy / "tokens" / "train" / "part-00000.arrow.tmp-1-deadbeef").write_bytes(b"ARROW1 half")
    prepare_data(config_for(p, copy))
    assert json.loads((copy / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())
    for a, b in zip(sorted((out / "tokens").rglob("*.arrow")), sorted((copy / "tokens").rglob("*.arrow")),
                    strict=True):
        assert np.array_equal(read_token_shard(a), read_token_shard(b))


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(root)): (f.stat().st_ino, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()}


def parquet_rows(path: Path) -> list[dict]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["order"])


DOWNSTREAM_OF_CLEAN = ["stats.json", "tokenizer.json", "_work/tokenized", "_work/token_counts", "tokens",
                       "manifest.json", "_SUCCESS"]
DOWNSTREAM_OF_RECORDS = ["_work/dups", "_work/mixing.json", "_work/counts", "clean", "rejected", *DOWNSTREAM_OF_CLEAN]


def remove(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# The records crash takes ~95 s here and exercises the same resume mechanism as the clean one (and
# test_data_s3's tokens crash): slow, to keep CI under 30 minutes.
@pytest.mark.parametrize("crash", [pytest.param("records", marks=pytest.mark.slow), "clean"])
def test_killed_job_reruns_only_unfinished_files(run, tmp_path: Path, crash: str) -> None:
    """A job killed in the records stage (one input file not done) or in the clean stage (one records file
    not finalized) redoes exactly those files and every later stage, and ends with the same documents,
    stats and token shards."""
    p, out = run
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    parts = sorted((copy / "_work" / "records").glob("part-*.parquet"))
    assert len(parts) >= 4
    victim = parts[len(parts) // 2].name
    if crash == "records":
        remove(copy, *DOWNSTREAM_OF_RECORDS, "_work/records/_SUCCESS", f"_work/records/{victim}")
        redo = {f"_work/records/{victim}"}
    else:
        remove(copy, *DOWNSTREAM_OF_CLEAN, f"_work/counts/{victim}", f"clean/{victim}", f"rejected/{victim}")
        redo = {f"_work/counts/{victim}", f"clean/{victim}", f"rejected/{victim}"}
    before = stamps(copy)
    prepare_data(config_for(p, copy))
    after = stamps(copy)
    assert {f for f in before if after.get(f) != before[f]} == set()  # nothing finished was written again
    written = set(after) - set(before)
    assert {f for f in written if f.startswith("_work/records/part")} == {f for f in redo if f.startswith("_work/rec")}
    if crash == "clean":
        assert {f for f in written if f.startswith(("clean/", "rejected/", "_work/counts/"))} == redo
    for name in ("clean", "rejected"):
        assert parquet_rows(copy / name) == parquet_rows(out / name)
    assert json.loads((copy / "stats.json").read_text()) == json.loads((out / "stats.json").read_text())
    assert (copy / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    for a, b in zip(sorted((out / "tokens").rglob("*.arrow")), sorted((copy / "tokens").rglob("*.arrow")),
                    strict=True):
        assert np.array_equal(read_token_shard(a), read_token_shard(b))


def test_other_config_on_finished_output_is_refused(run) -> None:
    p, out = run
    with pytest.raises(ConfigError, match="holds a run of a different config"):
        prepare_data(config_for(p, out, "pack.seq_len=64"))


# A whole second data job (~70 s here): slow, to keep CI under 30 minutes. In CI the mixing rates and copies
# are checked in one process by tests/test_data_steps.py::test_mixing_rates_and_copies.
@pytest.mark.slow
def test_mixing_weights_are_realized(ray_cluster, planted, tmp_path: Path) -> None:
    p, root = planted
    cfg = load_data_config(None, ["tokenizer.vocab_size=400", "pack.seq_len=32", "mix.validation_fraction=0.0",
                                  "dedup.exact=false", "dedup.fuzzy=false"],  # dedup is tested above
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


# ------------------------------------------------------------------------------------------------ dedup on Ray Data
def planted_signatures(seed: int, n: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, exact_hash, signature) with exact copies, near-duplicate chains and stars (a few edits each),
    and pairs that share a band but disagree too much to be duplicates; orders are sparse and shuffled."""
    rng = np.random.default_rng(seed)
    sig = rng.integers(0, 1 << 32, size=(n, width), dtype=np.uint64).astype(np.uint32)
    hashes = rng.integers(-(1 << 62), 1 << 62, size=n, dtype=np.int64)
    for i in range(1, n):
        kind = rng.integers(0, 6)
        parent = int(rng.integers(max(0, i - 40), i))
        if kind == 0:  # exact copy (same text: same hash and signature)
            sig[i], hashes[i] = sig[parent], hashes[parent]
        elif kind in (1, 2):  # near copy of a recent document: chains and stars form
            sig[i] = sig[parent]
            edits = rng.choice(width, size=int(rng.integers(1, width // 5)), replace=False)
            sig[i, edits] = rng.integers(0, 1 << 32, size=edits.size, dtype=np.uint64).astype(np.uint32)
        elif kind == 3:  # same first band, too different elsewhere: a candidate that verification rejects
            sig[i, :4] = sig[parent, :4]
    order = np.sort(rng.choice(1 << 40, size=n, replace=False)).astype(np.int64)
    perm = rng.permutation(n)  # documents arrive in no particular order
    return order[perm], hashes[perm], sig[perm]


def test_duplicates_dataset_decides_as_find_duplicates(ray_cluster) -> None:
    import pyarrow as pa
    import ray

    from data_pipeline.config import DedupConfig
    from data_pipeline.dedup import duplicates_dataset, find_duplicates

    cfg = DedupConfig(num_bands=8, rows_per_band=4, threshold=0.7)
    order, hashes, sig = planted_signatures(1, 3000, 32)
    expected = find_duplicates(order, hashes, sig, cfg)
    reasons = set(expected.values())
    assert reasons == {"dedup.exact", "dedup.near"} and 300 < len(expected) < 2500  # the corpus plants both
    table = pa.table({"order": order, "exact_hash": hashes,
                      "signature": pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), 32),
                      "text": ["x"] * order.size})  # other columns are ignored
    ds = ray.data.from_arrow([table.slice(i, 500) for i in range(0, order.size, 500)])
    got = duplicates_dataset(ds, cfg, num_partitions=3).to_arrow_refs()
    rows = pa.concat_tables(ray.get(got)).to_pydict()  # the test's driver may collect; the job's never does
    assert len(rows["order"]) == len(set(rows["order"]))
    assert dict(zip(rows["order"], rows["dup_reason"], strict=True)) == expected


# The worst case for the rounds (~80 s here): slow, to keep CI under 30 minutes. In CI the components are
# checked by test_duplicates_dataset_decides_as_find_duplicates (chains and stars among 3,000 planted
# signatures) and by the planted corpus' exact near-duplicate count.
@pytest.mark.slow
def test_components_of_a_shuffled_path_and_of_stars(ray_cluster) -> None:
    """Min-label propagation's worst case, a path whose labels must travel its whole length, shuffled."""
    import pyarrow as pa
    import ray

    from data_pipeline.dedup import component_leaves

    rng = np.random.default_rng(0)
    path = rng.permutation(np.arange(1000, 1100, dtype=np.int64))  # one component, nodes in random order
    edges = [(int(min(a, b)), int(max(a, b))) for a, b in zip(path[:-1], path[1:], strict=True)]
    edges += [(5, 7), (5, 9), (7, 11), (20, 21)]  # two more components: {5, 7, 9, 11} and {20, 21}
    rng.shuffle(edges)
    lo, hi = zip(*edges, strict=True)
    ds = ray.data.from_arrow(pa.table({"lo": pa.array(lo, pa.int64()), "hi": pa.array(hi, pa.int64())}))
    stars, rounds = component_leaves(ds, num_partitions=4)
    t = pa.concat_tables(ray.get(stars.to_arrow_refs()))
    t = t.filter(pa.compute.not_equal(t.column("lo"), t.column("hi")))
    got = dict(zip(t.column("hi").to_pylist(), t.column("lo").to_pylist(), strict=True))
    want = {int(v): 1000 for v in path if v != 1000} | {7: 5, 9: 5, 11: 5, 21: 20}
    assert got == want
    assert 1 < rounds < 40

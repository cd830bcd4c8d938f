"""Exact and MinHash-LSH fuzzy deduplication on character n-grams, across sources.

Two halves: ``DedupSignature`` is a per-document step (runs in parallel in Ray Data) that computes an exact
hash of the normalized text and a MinHash signature of its character n-gram shingles; ``find_duplicates``
runs once over the small (order, hash, signature) table of the surviving documents: LSH banding gives
candidate pairs, candidates are verified by signature agreement (estimated Jaccard >= threshold),
union-find groups them, and every group keeps its document with the smallest ``order`` (so the result does
not depend on parallelism or block boundaries).

Follows datatrove's MinhashDedup (32-bit signature values from seeded hash permutations; ours are
multiply-shift hashes) and NeMo Curator's character n-gram shingles (no word segmentation, so zh and en
are treated alike).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from aquila_ray.errors import ConfigError, DataError
from data_pipeline.config import DedupConfig

if TYPE_CHECKING:  # the per-document steps above run without importing Ray
    import ray.data

_SHIFT32 = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)
_CHUNK = 8192  # shingles per MinHash block: (num_perm, _CHUNK) uint64, the fastest of 2k..32k on the 2-core CI VM


def normalize_for_dedup(text: str) -> str:
    """Lower-case, whitespace runs collapsed: what 'the same text' means for both exact and fuzzy dedup."""
    return " ".join(text.lower().split())


def exact_hash(text: str) -> int:
    """Signed 64-bit xxh64 of the normalized text (signed so it stores as int64)."""
    h = xxhash.xxh64_intdigest(normalize_for_dedup(text).encode("utf-8"))
    return h - (1 << 64) if h >= (1 << 63) else h


def shingle_hashes(text: str, n: int, unique: bool = True) -> np.ndarray:
    """32-bit hashes of the character n-grams of the normalized text (as uint64), sorted and unique, or in
    text order with repeats when ``unique`` is False (what a MinHash needs: a minimum ignores repeats)."""
    norm = normalize_for_dedup(text)
    cp = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if cp.size == 0:
        return np.zeros(1, dtype=np.uint64)
    if cp.size < n:
        n = int(cp.size)
    m = cp.size - n + 1
    h = cp[:m].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):  # polynomial rolling hash, wrapping mod 2^64
            h *= np.uint64(1_000_003)
            h += cp[k:k + m]
        # murmur3 finalizer for a well-mixed 32-bit value
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    h &= _MASK32
    return np.unique(h) if unique else h


class MinHasher:
    """num_bands * rows_per_band MinHash permutations (seeded)."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self.num_perm = config.num_bands * config.rows_per_band
        rng = np.random.default_rng(config.seed)
        # multiply-shift hashing (Dietzfelbinger et al. 1997): ((a*x + b) mod 2^64) >> 32 with odd a; the
        # wrap-around is the "mod 2^64", and it avoids the slow 64-bit modulo of (a*x + b) mod (2^61 - 1).
        self.a = rng.integers(0, np.iinfo(np.uint64).max, size=(self.num_perm, 1), dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, np.iinfo(np.uint64).max, size=(self.num_perm, 1), dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 MinHash signature."""
        return self.signatures([text])[0]

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures. The shingles of many documents are hashed
        together in blocks of about ``_CHUNK`` (one numpy pass per block instead of one per document; a long
        document is split over blocks, so memory stays bounded), each block reduced per document with
        ``minimum.reduceat``. The ``>> 32`` comes after the minimum: a shift is monotone, so it commutes."""
        n = self.config.ngram_size
        pieces = [(d, sh[s:s + _CHUNK]) for d, text in enumerate(texts)
                  for sh in (shingle_hashes(text, n, unique=False),) for s in range(0, sh.size, _CHUNK)]
        sig = np.full((len(texts), self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        start = 0
        while start < len(pieces):
            end, total = start + 1, pieces[start][1].size
            while end < len(pieces) and total + pieces[end][1].size <= _CHUNK:
                total += pieces[end][1].size
                end += 1
            docs = np.asarray([d for d, _ in pieces[start:end]], dtype=np.int64)
            sizes = np.asarray([p.size for _, p in pieces[start:end]], dtype=np.int64)
            vals = np.multiply(self.a, np.concatenate([p for _, p in pieces[start:end]])[None, :])
            vals += self.b  # (P, total), wrapping mod 2^64
            mins = np.minimum.reduceat(vals, np.cumsum(sizes) - sizes, axis=1).T  # (pieces, P)
            if docs.size == np.unique(docs).size:
                np.minimum(sig[docs], mins, out=mins)
                sig[docs] = mins
            else:  # a long document's pieces in one block
                np.minimum.at(sig, docs, mins)
            start = end
        return (sig >> _SHIFT32).astype(np.uint32)


class DedupSignature:
    """Step: adds ``exact_hash`` (int64) and ``signature`` ((num_perm,) uint32) to every record; dropped
    records get zeros. Drops nothing itself (duplicates are decided corpus-wide by ``find_duplicates``)."""

    name: ClassVar[str] = "signature"

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self.hasher = MinHasher(config)
        self.counts: Counter[str] = Counter()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = dict(batch)
        n = len(batch["reason"])
        alive = [i for i in range(n) if not batch["reason"][i]]
        hashes = np.zeros(n, dtype=np.int64)
        sigs = np.zeros((n, self.hasher.num_perm if self.config.fuzzy else 1), dtype=np.uint32)
        hashes[alive] = [exact_hash(batch["text"][i]) for i in alive]
        if self.config.fuzzy and alive:
            sigs[alive] = self.hasher.signatures([batch["text"][i] for i in alive])
        self.counts["in"] += len(alive)
        self.counts["kept"] = self.counts["in"]
        batch["exact_hash"] = hashes
        batch["signature"] = sigs
        return batch


def jaccard(a: str, b: str, n: int) -> float:
    """True Jaccard similarity of the two texts' character n-gram sets (for tests and the benchmark)."""
    sa, sb = set(shingle_hashes(a, n).tolist()), set(shingle_hashes(b, n).tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the smaller index (= smaller order, rows are sorted) stays the root
            self.parent[max(rx, ry)] = min(rx, ry)


def find_duplicates(order: np.ndarray, hashes: np.ndarray, signatures: np.ndarray | None,
                    config: DedupConfig) -> dict[int, str]:
    """Map the ``order`` of every duplicate document to ``dedup.exact`` or ``dedup.near``.

    Inputs are the surviving documents only. In each duplicate group the smallest ``order`` is kept.
    """
    out: dict[int, str] = {}
    if order.size == 0:
        return out
    idx = np.argsort(order, kind="stable")
    order, hashes = order[idx], hashes[idx]
    sigs = signatures[idx] if signatures is not None else None
    alive = np.ones(order.size, dtype=bool)
    if config.exact:
        _, first = np.unique(hashes, return_index=True)  # first occurrence = smallest order
        dup = np.ones(order.size, dtype=bool)
        dup[first] = False
        for o in order[dup].tolist():
            out[int(o)] = "dedup.exact"
        alive &= ~dup
    if not config.fuzzy or sigs is None or sigs.shape[1] < config.num_bands * config.rows_per_band:
        return out
    rows = np.flatnonzero(alive)
    sub = sigs[rows].astype(np.uint64)
    uf = _UnionFind(rows.size)
    r = config.rows_per_band
    mult = np.random.default_rng(12345).integers(1, 1 << 61, size=r, dtype=np.uint64) | np.uint64(1)
    for band in range(config.num_bands):
        with np.errstate(over="ignore"):
            keys = (sub[:, band * r:(band + 1) * r] * mult).sum(axis=1)  # wrapping mod 2^64
        srt = np.argsort(keys, kind="stable")
        k_sorted = keys[srt]
        starts = np.flatnonzero(np.r_[True, k_sorted[1:] != k_sorted[:-1]])
        ends = np.r_[starts[1:], k_sorted.size]
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            if e - s < 2:
                continue
            members = np.sort(srt[s:e])
            head = members[0]
            for m in members[1:].tolist():
                if uf.find(m) == uf.find(head):
                    continue
                if float(np.mean(sub[head] == sub[m])) >= config.threshold:
                    uf.union(head, m)
    for j in range(rows.size):
        if uf.find(j) != j:
            out[int(order[rows[j]])] = "dedup.near"
    return out


# ----------------------------------------------------------------------------------------------------------------
# The same decisions as ``find_duplicates``, as Ray Data shuffles: nothing per document reaches the driver.
#
# Every corpus-wide step is one hash shuffle followed by a vectorised pyarrow/numpy function over a whole
# partition (``_by_key``): ``repartition(keys=...)`` puts all rows of a key into one block, and ``map_batches``
# with ``batch_size=None`` hands that block over whole. This is how Ray's own ``GroupedData.map_groups`` runs,
# minus its Python call per group (most LSH buckets hold one document, so a call per group would dominate).
#
#   exact    (order, exact_hash, signature) by exact_hash: the smallest order per hash survives
#   buckets  survivors -> (band, key, order) rows, by (band, key): head = smallest order of each bucket;
#            every other member gives one candidate pair (head, member), one request row per end
#   verify   requests join the survivors' signatures on order (Dataset.join), then by (head, member): both ends
#            meet, agreement >= threshold makes the pair an edge (head, member), head < member
#   labels   connected components of the edges by alternating large-star / small-star rounds (Kiveris et al.,
#            "Connected Components in MapReduce and Beyond", SoCC 2014), each one shuffle by node; the driver
#            reads one number per round, how many nodes are not yet in a star. In the final star forest every
#            non-centre node (a larger order) is a near duplicate of its centre, the component's smallest order.
# ----------------------------------------------------------------------------------------------------------------

EXACT_REASON = "dedup.exact"
NEAR_REASON = "dedup.near"
_MAX_ROUNDS = 100  # large-star/small-star needs O(log^2 n) rounds; 100 is never reached by a correct run
_RESULT_SCHEMA = pa.schema([("order", pa.int64()), ("dup_reason", pa.string())])
_EDGE_SCHEMA = pa.schema([("lo", pa.int64()), ("hi", pa.int64())])

log = logging.getLogger(__name__)


def _band_multipliers(rows_per_band: int) -> np.ndarray:
    """The band-key multipliers ``find_duplicates`` uses (same seed, same draw)."""
    return np.random.default_rng(12345).integers(1, 1 << 61, size=rows_per_band, dtype=np.uint64) | np.uint64(1)


def _signature_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(rows, width) uint32 view of a ``fixed_size_list<uint32>[width]`` column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise DataError(f"dedup: column 'signature' has {arr.null_count} null rows; expected a MinHash signature "
                        "on every surviving document")
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.uint32, copy=False).reshape(len(arr), width)


def _sorted(table: pa.Table, *keys: str) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))


def _run_starts(*columns: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows that start a run of equal values (over all columns) in sorted columns."""
    n = columns[0].size
    start = np.zeros(n, dtype=bool)
    if n:
        start[0] = True
        for c in columns:
            start[1:] |= c[1:] != c[:-1]
    return start


def _result_rows(order: np.ndarray | pa.Array, reason: str) -> pa.Table:
    return pa.table({"order": pa.array(order, pa.int64()),
                     "dup_reason": pa.repeat(pa.scalar(reason, pa.string()), len(order))}, schema=_RESULT_SCHEMA)


# -- exact --------------------------------------------------------------------------------------------------------

def _mark_exact(table: pa.Table) -> pa.Table:
    """One exact_hash partition -> (order, exact_dup, signature): all but the smallest order per hash are dups."""
    table = _sorted(table, "exact_hash", "order")
    dup = ~_run_starts(table.column("exact_hash").to_numpy())
    return table.drop_columns(["exact_hash"]).append_column("exact_dup", pa.array(dup, pa.bool_()))


def _exact_rows(table: pa.Table) -> pa.Table:
    return _result_rows(table.column("order").filter(table.column("exact_dup")), EXACT_REASON)


def _exact_survivors(table: pa.Table) -> pa.Table:
    return table.filter(pc.invert(table.column("exact_dup"))).drop_columns(["exact_dup"])


# -- buckets ------------------------------------------------------------------------------------------------------

def _band_rows(table: pa.Table, num_bands: int, rows_per_band: int) -> pa.Table:
    """(order, signature) -> one (band, key, order) row per document and band, keys as in ``find_duplicates``."""
    n = table.num_rows
    sig = _signature_matrix(table.column("signature"))[:, :num_bands * rows_per_band].astype(np.uint64)
    with np.errstate(over="ignore"):  # wrapping mod 2^64, as the reference
        keys = (sig.reshape(n, num_bands, rows_per_band) * _band_multipliers(rows_per_band)).sum(axis=2)  # (n, B)
    return pa.table({"band": pa.array(np.tile(np.arange(num_bands, dtype=np.int32), n)),
                     "key": pa.array(keys.reshape(-1)),
                     "order": pa.array(np.repeat(table.column("order").to_numpy(), num_bands))})


def _bucket_requests(table: pa.Table) -> pa.Table:
    """One (band, key) partition -> the candidate pairs (head, member) of its buckets, deduplicated within the
    partition, as two request rows each (``order`` = the end whose signature is needed)."""
    table = _sorted(table, "band", "key", "order")
    order = table.column("order").to_numpy()
    start = _run_starts(table.column("band").to_numpy(), table.column("key").to_numpy())
    head = order[np.maximum.accumulate(np.where(start, np.arange(order.size), 0))] if order.size else order
    head, member = head[~start], order[~start]
    srt = np.lexsort((member, head))
    head, member = head[srt], member[srt]
    keep = _run_starts(head, member)
    head, member = head[keep], member[keep]
    return pa.table({"order": pa.array(np.concatenate([head, member]), pa.int64()),
                     "head": pa.array(np.concatenate([head, head]), pa.int64()),
                     "member": pa.array(np.concatenate([member, member]), pa.int64())})


def _verify_pairs(table: pa.Table, threshold: float) -> pa.Table:
    """One (head, member) partition of requests with their signatures -> the accepted edges (lo=head, hi=member).

    Same test as ``find_duplicates``: the fraction of equal signature values, over the whole signature, is at
    least ``threshold``."""
    table = _sorted(table, "head", "member", "order")
    head, member = table.column("head").to_numpy(), table.column("member").to_numpy()
    order = table.column("order").to_numpy()
    keep = _run_starts(head, member, order)  # a pair found in several bands (or partitions) is checked once
    head, member, order = head[keep], member[keep], order[keep]
    sig = _signature_matrix(table.column("signature").filter(pa.array(keep)))
    # Every pair now has exactly two rows, the head's (order == head < member) first.
    if not (np.array_equal(order[0::2], head[0::2]) and np.array_equal(order[1::2], member[1::2])):
        raise RuntimeError("dedup: a candidate pair did not find both signatures; are 'order' values unique?")
    agree = np.count_nonzero(sig[0::2] == sig[1::2], axis=1)
    accept = agree / sig.shape[1] >= threshold  # float64, as np.mean in the reference
    return pa.table({"lo": pa.array(head[0::2][accept], pa.int64()),
                     "hi": pa.array(member[0::2][accept], pa.int64())}, schema=_EDGE_SCHEMA)


# -- labels -------------------------------------------------------------------------------------------------------

def _both_directions(table: pa.Table) -> pa.Table:
    """Edges (lo, hi) -> adjacency rows (node, nb) in both directions; self-loops (round markers) dropped."""
    lo, hi = table.column("lo").to_numpy(), table.column("hi").to_numpy()
    real = lo != hi
    lo, hi = lo[real], hi[real]
    return pa.table({"node": pa.array(np.concatenate([lo, hi]), pa.int64()),
                     "nb": pa.array(np.concatenate([hi, lo]), pa.int64())})


def large_star(table: pa.Table) -> pa.Table:
    """One node partition of adjacency rows (node, nb) -> edges (lo, hi).

    Large-star: every neighbour larger than the node is linked to the smallest of the node's closed
    neighbourhood. A node that is not settled (it has a smaller neighbour and more than one neighbour) also
    emits a self-loop (node, node): the driver counts these to know whether the input was already a star
    forest (then the output equals the input); the next step drops them.
    """
    table = _sorted(table, "node", "nb")
    node, nb = table.column("node").to_numpy(), table.column("nb").to_numpy()
    keep = _run_starts(node, nb)
    node, nb = node[keep], nb[keep]
    start = _run_starts(node)
    group = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    smallest = np.minimum(node[first], nb[first])[group]  # nb is sorted: the group's first is its smallest
    degree = np.diff(np.r_[first, node.size])
    unsettled = (nb[first] < node[first]) & (degree > 1)
    larger = nb > node
    markers = node[first][unsettled]
    return pa.table({"lo": pa.array(np.concatenate([smallest[larger], markers]), pa.int64()),
                     "hi": pa.array(np.concatenate([nb[larger], markers]), pa.int64())}, schema=_EDGE_SCHEMA)


def small_star(table: pa.Table) -> pa.Table:
    """One ``hi`` partition of edges (lo, hi) -> edges (lo, hi).

    Small-star: a node and all its smaller neighbours are linked to the smallest of them. Self-loops (markers of
    the previous large-star) are dropped."""
    table = _sorted(table, "hi", "lo")
    lo, hi = table.column("lo").to_numpy(), table.column("hi").to_numpy()
    keep = _run_starts(hi, lo) & (lo != hi)
    lo, hi = lo[keep], hi[keep]
    start = _run_starts(hi)
    smallest = lo[np.maximum.accumulate(np.where(start, np.arange(lo.size), 0))] if lo.size else lo
    linked = lo != smallest
    return pa.table({"lo": pa.array(np.concatenate([smallest[linked], lo[start]]), pa.int64()),
                     "hi": pa.array(np.concatenate([lo[linked], hi[start]]), pa.int64())}, schema=_EDGE_SCHEMA)


def _by_key(ds: ray.data.Dataset, keys: list[str], fn: Any, num_partitions: int, **fn_kwargs: Any
            ) -> ray.data.Dataset:
    """Hash-partition ``ds`` on ``keys`` and apply ``fn`` to each whole partition (a pyarrow Table)."""
    return ds.repartition(num_partitions, keys=keys).map_batches(
        fn, batch_size=None, batch_format="pyarrow", zero_copy_batch=True, fn_kwargs=fn_kwargs or None)


def _is_marker(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("lo"), table.column("hi")))


def component_leaves(edges: ray.data.Dataset, num_partitions: int) -> tuple[ray.data.Dataset, int]:
    """Connected components of an undirected graph given as edges (lo, hi) with lo < hi, int64.

    Returns the edges of the final star forest (lo = the component's smallest node, hi = every other node, each
    once) as a materialized Dataset, and the number of large-star rounds run (1 when the input was already a
    star forest). Runs its shuffles when called; the driver reads only one count per round.
    """
    current = edges
    for rounds in range(1, _MAX_ROUNDS + 1):
        if rounds > 1:  # small-star, then large-star on its output, executed as one pipeline below
            current = _by_key(current, ["hi"], small_star, num_partitions)
        current = _by_key(current.map_batches(_both_directions, batch_format="pyarrow", zero_copy_batch=True),
                          ["node"], large_star, num_partitions).materialize()
        unsettled = current.map_batches(_is_marker, batch_format="pyarrow", zero_copy_batch=True).count()
        log.info("dedup: large-star round %d, %d nodes not yet in a star", rounds, unsettled)
        if unsettled == 0:
            return current, rounds
    raise RuntimeError(f"dedup: connected components did not converge in {_MAX_ROUNDS} rounds")


# -- the whole decision -------------------------------------------------------------------------------------------

def _empty_result() -> ray.data.Dataset:
    import ray.data  # deferred: the per-document steps above run (in Ray Data workers and tests) without Ray's import

    return ray.data.from_arrow(_RESULT_SCHEMA.empty_table())


def default_num_partitions() -> int:
    """Shuffle partitions when none are given: one per CPU of the running Ray cluster."""
    import ray  # deferred: as in _empty_result

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def duplicates_dataset(alive: ray.data.Dataset, config: DedupConfig, *,
                       num_partitions: int | None = None) -> ray.data.Dataset:
    """The duplicate documents among ``alive``, decided exactly as ``find_duplicates`` decides them.

    ``alive``: the documents that survived the earlier filters, with columns ``order`` (int64, unique),
    ``exact_hash`` (int64) and, when ``config.fuzzy``, ``signature`` (``fixed_size_list<uint32>[w]``); other
    columns are ignored. It is read once.

    Returns a Dataset with one row per duplicate: ``order`` (int64) and ``dup_reason`` (string,
    ``dedup.exact`` or ``dedup.near``); every other document of ``alive`` is kept. Apply it with a join on
    ``order`` (e.g. ``left_anti`` to keep, ``left_outer`` to label).

    Runs the exact and near-duplicate shuffles when called (the connected components need one count per
    round), so its blocks are already in the object store; nothing per document is collected on the driver.
    ``num_partitions``: hash partitions of every shuffle (default: one per cluster CPU); raise it when a
    partition (``rows / num_partitions`` documents with their signatures) would not fit a worker's memory.
    """
    if num_partitions is None:
        num_partitions = default_num_partitions()
    if num_partitions < 1:
        raise ConfigError(f"dedup: num_partitions={num_partitions} is invalid; expected >= 1")
    schema = alive.schema()
    names = set(schema.names) if schema is not None else set()
    missing = {"order", "exact_hash"} - names
    if missing:
        raise DataError(f"dedup: input columns {sorted(missing)} are missing (have {sorted(names)}); expected "
                        "order (int64), exact_hash (int64) and signature (fixed_size_list<uint32>)")
    width = 0
    if config.fuzzy and "signature" in names:
        sig_type = schema.types[schema.names.index("signature")]
        if not (pa.types.is_fixed_size_list(sig_type) and pa.types.is_uint32(sig_type.value_type)):
            raise DataError(f"dedup: column 'signature' has type {sig_type}; expected fixed_size_list<uint32>[w]")
        width = sig_type.list_size
    fuzzy = config.fuzzy and width >= config.num_bands * config.rows_per_band
    columns = ["order", "exact_hash"] + (["signature"] if fuzzy else [])
    rows = alive.select_columns(columns)
    parts: list[ray.data.Dataset] = []
    if config.exact:
        marked = _by_key(rows, ["exact_hash"], _mark_exact, num_partitions).materialize()
        parts.append(marked.map_batches(_exact_rows, batch_format="pyarrow", zero_copy_batch=True))
        survivors = marked.map_batches(_exact_survivors, batch_format="pyarrow", zero_copy_batch=True)
    else:
        survivors = rows.drop_columns(["exact_hash"])
    if fuzzy:
        survivors = survivors.materialize()  # read twice: banding and the signature join
        bands = survivors.map_batches(_band_rows, batch_format="pyarrow", zero_copy_batch=True,
                                      fn_kwargs={"num_bands": config.num_bands,
                                                 "rows_per_band": config.rows_per_band})
        requests = _by_key(bands, ["band", "key"], _bucket_requests, num_partitions)
        with_sigs = requests.join(survivors, join_type="inner", num_partitions=num_partitions, on=("order",))
        edges = _by_key(with_sigs, ["head", "member"], _verify_pairs, num_partitions,
                        threshold=config.threshold).materialize()
        num_edges = edges.count()
        log.info("dedup: %d verified near-duplicate edges", num_edges)
        if num_edges:
            stars, _ = component_leaves(edges, num_partitions)
            parts.append(stars.map_batches(lambda t: _result_rows(t.column("hi"), NEAR_REASON),
                                           batch_format="pyarrow", zero_copy_batch=True))
    if not parts:
        return _empty_result()
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

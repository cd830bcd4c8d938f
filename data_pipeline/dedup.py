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

from collections import Counter
from typing import Any, ClassVar

import numpy as np
import xxhash

from data_pipeline.config import DedupConfig

_SHIFT32 = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)
_CHUNK = 4096


def normalize_for_dedup(text: str) -> str:
    """Lower-case, whitespace runs collapsed: what 'the same text' means for both exact and fuzzy dedup."""
    return " ".join(text.lower().split())


def exact_hash(text: str) -> int:
    """Signed 64-bit xxh64 of the normalized text (signed so it stores as int64)."""
    h = xxhash.xxh64_intdigest(normalize_for_dedup(text).encode("utf-8"))
    return h - (1 << 64) if h >= (1 << 63) else h


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Unique 32-bit hashes of the character n-grams of the normalized text (as uint64)."""
    norm = normalize_for_dedup(text)
    cp = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if cp.size == 0:
        return np.zeros(1, dtype=np.uint64)
    if cp.size < n:
        n = int(cp.size)
    m = cp.size - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):  # polynomial rolling hash, wrapping mod 2^64
            h = h * np.uint64(1_000_003) + cp[k:k + m]
        # murmur3 finalizer for a well-mixed 32-bit value
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return np.unique(h & _MASK32)


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
        sh = shingle_hashes(text, self.config.ngram_size)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, sh.size, _CHUNK):  # bounded memory for long documents
            chunk = sh[None, start:start + _CHUNK]
            vals = (self.a * chunk + self.b) >> _SHIFT32  # (P, chunk), wrapping mod 2^64
            np.minimum(sig, vals.min(axis=1), out=sig)
        return sig.astype(np.uint32)


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
        hashes = np.zeros(n, dtype=np.int64)
        sigs = np.zeros((n, self.hasher.num_perm if self.config.fuzzy else 1), dtype=np.uint32)
        for i in range(n):
            if batch["reason"][i]:
                continue
            self.counts["in"] += 1
            text = batch["text"][i]
            hashes[i] = exact_hash(text)
            if self.config.fuzzy:
                sigs[i] = self.hasher.signature(text)
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

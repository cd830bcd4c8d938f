"""The index-addressed training data: token shards read by record batch in a keyed, world-size-free order.

DESIGN.md "Deterministic data order": the train split's sequences form one global index space across its
shards (shard order from the manifest). The sample stream is epoch 0's order, then epoch 1's, ..., each a
keyed bijection of all sequences (key: (seed, epoch)). A step consumes the next ``B`` stream positions,
``[consumed, consumed + B)``; rank ``r`` of ``W`` takes the contiguous slice
``[consumed + r * B / W, consumed + (r + 1) * B / W)``. Nothing depends on W, so restarting, or resuming at
another worker count, continues the same sample sequence (Ray Data cannot skip to a position; this can).

Memory does not grow with the corpus. The epoch order is computed for the positions asked for, never stored:
a balanced Feistel network over the next power of four with cycle-walking (Black and Rogaway, "Ciphers with
arbitrary finite domains", CT-RSA 2002: the construction of TensorFlow's ``random_index_shuffle``, which
Grain's global shuffle reuses; they use the Simon cipher's rounds, we use splitmix64's) in uint64 numpy
arithmetic: the same order on every platform and numpy version. Rows are read one record batch at a time
(``shards.ShardReader``) through an LRU whose bytes are capped (``TrainConfig.data_cache_bytes``).

Why a global bijection by default, not shard-then-window shuffles (MosaicML streaming, WebDataset): on local
memory-mapped shards a random row costs a few pages, so the exact uniform order is cheap. On object storage a
row costs a whole record batch; there ``shuffle_window`` (``TrainConfig.data_shuffle_window``) applies the
same bijection at two levels, windows of consecutive sequences and rows within a window, so a window's
batches are fetched once and served from the cache (docs/training.md "Reading the data").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from aquila_ray.data.shards import Manifest, ShardReader, join_location, read_manifest, resolve_location
from aquila_ray.errors import DataError

DEFAULT_CACHE_BYTES = 1 << 30
"""The default byte cap of a dataset's record-batch LRU (``TrainConfig.data_cache_bytes``)."""
MAX_OPEN_REMOTE_SHARDS = 64
"""Non-local shards a dataset keeps a file handle to (every shard's batch layout is kept: a few integers)."""


class BatchCache:
    """An LRU of record batches (read-only uint32 arrays) holding at most ``max_bytes`` of them.

    A batch is charged its full size whether it is memory-mapped (an upper bound on the pages it can make
    resident) or read into memory. A batch larger than the cap is handed out but not kept, so what a caller
    holds beyond the cap is the one batch it is using.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        """Bytes held now."""
        self.peak_bytes = 0
        """The most bytes ever held at once (never above ``max_bytes``)."""
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._entries

    def get(self, key: tuple[int, int], load: Callable[[], np.ndarray]) -> np.ndarray:
        batch = self._entries.get(key)
        if batch is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return batch
        self.misses += 1
        batch = load()
        if batch.nbytes <= self.max_bytes:
            while self.bytes + batch.nbytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes
            self._entries[key] = batch
            self.bytes += batch.nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes)
        return batch

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


class TokenDataset:
    """Random access to one split's sequences by global index, reading only the record batches that hold them.

    ``data_dir`` is a local directory or a URI (``s3://bucket/data``; ``filesystem`` for a path inside a given
    pyarrow filesystem). ``cache_bytes`` caps the record batches kept between calls (``BatchCache``);
    ``shuffle_window`` is the epoch order's window (0: one permutation of all sequences; see
    ``epoch_order``), used by ``rank_batch``.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", manifest: Manifest | None = None, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, shuffle_window: int = 0,
                 filesystem: pafs.FileSystem | None = None) -> None:
        if not isinstance(cache_bytes, int) or cache_bytes <= 0:
            raise DataError(f"TokenDataset cache_bytes={cache_bytes!r} must be a positive integer")
        if not isinstance(shuffle_window, int) or shuffle_window < 0:
            raise DataError(f"TokenDataset shuffle_window={shuffle_window!r} must be an integer >= 0")
        self.manifest = manifest or read_manifest(data_dir, filesystem)
        if split not in self.manifest.splits or self.manifest.splits[split].num_sequences == 0:
            counts = {k: v.num_sequences for k, v in self.manifest.splits.items()}
            raise DataError(f"split {split!r} has no sequences in {data_dir}/manifest.json (sequences per split: "
                            f"{counts}); prepare data with python -m jobs.prepare_data")
        self.split = split
        self.seq_len = self.manifest.seq_len
        self.shuffle_window = shuffle_window
        files = self.manifest.splits[split].files
        self._fs, root = resolve_location(self.manifest.root, filesystem)  # one filesystem for every shard
        self.paths = [str(join_location(root, f.path)) for f in files]
        self.offsets = np.concatenate([[0], np.cumsum([f.num_sequences for f in files])]).astype(np.int64)
        """Shard ``i`` holds global indices ``[offsets[i], offsets[i + 1])``."""
        self.cache = BatchCache(cache_bytes)
        self._readers: dict[int, ShardReader] = {}
        self._open_remote: OrderedDict[int, ShardReader] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _reader(self, i: int) -> ShardReader:
        reader = self._readers.get(i)
        if reader is None:
            reader = ShardReader(self.paths[i], self._fs)
            expected = (int(self.offsets[i + 1] - self.offsets[i]), self.seq_len + 1)
            if (reader.num_rows, reader.width) != expected:
                raise DataError(f"token shard {reader.location} holds shape {(reader.num_rows, reader.width)}; "
                                f"the manifest says {expected}")
            self._readers[i] = reader
        if not reader.memory_mapped:
            self._open_remote[i] = reader
            self._open_remote.move_to_end(i)
            if len(self._open_remote) > MAX_OPEN_REMOTE_SHARDS:
                self._open_remote.popitem(last=False)[1].close()
        return reader

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Rows for global indices, in the given order: (n, seq_len + 1) int64 (a copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"sequence indices [{idx.min()}, {idx.max()}] outside [0, {len(self)}), the "
                            f"{self.split!r} split's sequences")
        out = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        groups = []  # (shard, batch, where in idx, rows in the batch)
        for s in np.unique(shard_of).tolist():
            where = np.flatnonzero(shard_of == s)
            rows = idx[where] - self.offsets[s]
            reader = self._reader(s)
            batch_of = reader.batch_index(rows)
            for b in np.unique(batch_of).tolist():
                hit = batch_of == b
                groups.append((s, b, where[hit], rows[hit] - reader.batch_offsets[b]))
        groups.sort(key=lambda g: (g[0], g[1]) not in self.cache)  # cached first: loading the rest evicts
        for s, b, where, rows in groups:
            batch = self.cache.get((s, b), lambda: self._reader(s).batch(b))  # noqa: B023 (called at once)
            out[where] = batch[rows]
            del batch  # beyond the cap, only the batch in use is held
        return out


# ---- the epoch order: a keyed bijection, computed per position ------------------------------------------

_M64 = (1 << 64) - 1
_ROUNDS = 6


def _splitmix64(x: int) -> int:
    """splitmix64 (Steele, Lea, Flood 2014) on Python ints: the key schedule."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, epoch, purpose): splitmix64 chained over them."""
    key = 0
    for p in parts:
        key = _splitmix64(key ^ (p & _M64))
    return key


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping multiplication): the Feistel round function."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class KeyedPermutation:
    """A bijection of ``[0, n)`` chosen by a 64-bit key, evaluated at any points in O(points) memory.

    A balanced Feistel network on ``2 * half`` bits (the smallest power of four >= n, so at most 4n), six
    rounds, round ``i``: ``(L, R) -> (R, L ^ (mix(R ^ k_i ^ tweak) & mask))``; points that land at or beyond
    ``n`` are encrypted again until they fall inside (cycle-walking keeps it a bijection of ``[0, n)``;
    fewer than 4 rounds of walking on average). ``tweak`` (per point, optional) selects one of a family of
    permutations at no cost: ``epoch_order`` uses the window index.
    """

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise DataError(f"a permutation needs n >= 1 elements, got {n}")
        self.n = n
        self.half = max(1, -(-(n - 1).bit_length() // 2))
        k = key
        round_keys = []
        for _ in range(_ROUNDS):
            k = _splitmix64(k)
            round_keys.append(k)
        self.round_keys = np.array(round_keys, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray, tweak: np.ndarray | np.uint64) -> np.ndarray:
        h = np.uint64(self.half)
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> h, x & mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix(right ^ k ^ tweak) & mask)
        return (left << h) | right

    def __call__(self, points: np.ndarray, tweak: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(points, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise DataError(f"permutation points must lie in [0, {self.n}), got [{x.min()}, {x.max()}]")
        y = x.astype(np.uint64)
        t = np.zeros(len(y), dtype=np.uint64) if tweak is None else _mix(np.asarray(tweak).astype(np.uint64))
        todo = np.arange(len(y))
        n = np.uint64(self.n)
        while todo.size:
            y[todo] = self._encrypt(y[todo], t[todo])
            todo = todo[y[todo] >= n]
        return y.astype(np.int64)


def epoch_order(num_sequences: int, seed: int, epoch: int, positions: np.ndarray,
                shuffle_window: int = 0) -> np.ndarray:
    """Global indices at within-epoch ``positions`` (each in ``[0, num_sequences)``) of epoch ``epoch``.

    ``shuffle_window == 0`` (or >= num_sequences): one ``KeyedPermutation`` of all sequences, key
    (seed, epoch). Otherwise, for locality: the sequences are cut into windows of ``shuffle_window``
    consecutive indices (the grid rotated by a keyed offset each epoch, so the partial window at the end
    moves); full windows come in a keyed order, each one's rows in a keyed order of its own, and the partial
    window's rows come last. Every epoch is still a bijection of the whole index space.
    """
    n = num_sequences
    pos = np.asarray(positions, dtype=np.int64)
    w = shuffle_window
    if w == 0 or w >= n:
        return KeyedPermutation(n, derive_key(seed, epoch, 0))(pos)
    num_full = n // w
    full = num_full * w
    out = np.empty_like(pos)
    head = pos < full
    window, offset = np.divmod(pos[head], w)
    window = KeyedPermutation(num_full, derive_key(seed, epoch, 1))(window)
    out[head] = window * w + KeyedPermutation(w, derive_key(seed, epoch, 2))(offset, tweak=window)
    if full < n:
        out[~head] = full + KeyedPermutation(n - full, derive_key(seed, epoch, 3))(pos[~head] - full)
    return (out + derive_key(seed, epoch, 4) % n) % n


def stream_indices(num_sequences: int, seed: int, start: int, count: int, shuffle_window: int = 0) -> np.ndarray:
    """Global sequence indices at sample-stream positions ``[start, start + count)`` (wrapping epochs)."""
    if num_sequences < 1:
        raise DataError(f"the sample stream needs at least one sequence, got num_sequences={num_sequences}")
    pos = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(pos, num_sequences)
    out = np.empty(count, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_order(num_sequences, seed, int(e), offsets[sel], shuffle_window)
    return out


def rank_slice(consumed: int, global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start position, count) of rank ``rank``'s contiguous share of the batch starting at ``consumed``."""
    if global_batch % world_size:
        raise DataError(f"global batch {global_batch} is not divisible by world size {world_size}")
    per_rank = global_batch // world_size
    return consumed + rank * per_rank, per_rank


def rank_batch(dataset: TokenDataset, seed: int, consumed: int, global_batch: int, rank: int,
               world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows of the step that starts at stream position ``consumed``: (indices, rows)."""
    start, count = rank_slice(consumed, global_batch, rank, world_size)
    idx = stream_indices(len(dataset), seed, start, count, dataset.shuffle_window)
    return idx, dataset.get(idx)

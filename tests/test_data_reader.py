"""The bounded training reader without Ray: record-batch reads under a byte cap, the keyed epoch order,
world-size independence, exact rows, pyarrow filesystems, and the errors on bad shards."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from aquila_ray.data.dataset import KeyedPermutation, TokenDataset, epoch_order, rank_batch, stream_indices
from aquila_ray.data.shards import (
    BATCH_ROWS,
    Manifest,
    ShardInfo,
    ShardReader,
    SplitInfo,
    read_manifest,
    read_token_shard,
    write_manifest,
    write_token_shard,
)
from aquila_ray.errors import DataError


def write_data(directory: Path, shards: list[np.ndarray], validation: np.ndarray | None = None) -> Path:
    """A data directory whose train split is ``shards`` (each an (N, seq_len + 1) array)."""
    seq_len = shards[0].shape[1] - 1
    files = []
    for i, rows in enumerate(shards):
        rel = f"tokens/train/part-{i:05d}.arrow"
        write_token_shard(directory / rel, rows)
        files.append(ShardInfo(rel, len(rows)))
    splits = {"train": SplitInfo(files)}
    if validation is not None:
        write_token_shard(directory / "tokens/validation/part-00000.arrow", validation)
        splits["validation"] = SplitInfo([ShardInfo("tokens/validation/part-00000.arrow", len(validation))])
    write_manifest(directory, Manifest(seq_len=seq_len, vocab_size=1 << 20, tokenizer_sha256="test", splits=splits))
    return directory


def random_rows(n: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 32, (n, width), dtype=np.uint64).astype(np.uint32)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# ---- (a) memory stays under the cap ----------------------------------------------------------------------

def test_rss_after_1000_random_batches_stays_under_cap_plus_one_batch(tmp_path: Path) -> None:
    seq_len, n = 64, 50_000
    rows = random_rows(n, seq_len + 1, seed=0)
    data = write_data(tmp_path, [rows])
    shard_bytes = rows.nbytes  # 13.0 MB
    batch_bytes = BATCH_ROWS * (seq_len + 1) * 4  # 2.13 MB
    del rows
    cap = 5 << 20  # two batches fit, the shard does not
    assert shard_bytes > cap + batch_bytes

    def read_1000_batches(ds: TokenDataset) -> int:
        """Reads 1,000 batches of 32 random rows; returns the RSS growth over the reads."""
        rng = np.random.default_rng(1)
        ds.get(np.arange(4))  # first-use allocations of pyarrow and numpy, outside the measurement
        gc.collect()
        before = rss_bytes()
        peak = 0
        for _ in range(1000):
            out = ds.get(rng.integers(0, len(ds), 32))
            peak = max(peak, rss_bytes() - before)
            assert out.shape == (32, seq_len + 1)
        return peak

    capped = TokenDataset(data, cache_bytes=cap)
    growth = read_1000_batches(capped)
    print(f"\nRSS growth over 1000 random batches: cap {cap / 1e6:.2f} MB -> {growth / 1e6:.2f} MB "
          f"(cache held at most {capped.cache.peak_bytes / 1e6:.2f} MB, hits {capped.cache.hits}, misses "
          f"{capped.cache.misses})")
    assert capped.cache.peak_bytes <= cap and capped.cache.misses > 7  # batches were evicted and read again
    assert growth <= cap + batch_bytes
    capped.cache.clear()
    del capped
    gc.collect()

    # The same reads without a cap keep every batch they touched: the whole shard becomes resident.
    uncapped = TokenDataset(data, cache_bytes=1 << 40)
    growth_uncapped = read_1000_batches(uncapped)
    print(f"without a cap: {growth_uncapped / 1e6:.2f} MB (shard {shard_bytes / 1e6:.2f} MB)")
    assert uncapped.cache.bytes == shard_bytes
    assert growth_uncapped > cap + batch_bytes


def test_a_batch_larger_than_the_cap_is_read_but_not_kept(tmp_path: Path) -> None:
    rows = random_rows(100, 9, seed=2)
    ds = TokenDataset(write_data(tmp_path, [rows]), cache_bytes=16)
    np.testing.assert_array_equal(ds.get(np.array([5, 99, 0])), rows[[5, 99, 0]])
    assert ds.cache.bytes == 0 and len(ds.cache) == 0 and ds.cache.misses == 1


# ---- (b) the epoch order is a bijection ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097, 65_537])
def test_epoch_order_is_a_bijection_and_epochs_differ(n: int) -> None:
    orders = [epoch_order(n, seed=3, epoch=e, positions=np.arange(n)) for e in range(3)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    if n >= 7:
        assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
        assert not np.array_equal(orders[0], epoch_order(n, seed=4, epoch=0, positions=np.arange(n)))


@pytest.mark.parametrize(("n", "window"), [(7, 3), (1000, 64), (4097, 1000), (4097, 4096), (50, 50), (50, 80)])
def test_windowed_order_is_a_bijection_that_reads_one_window_at_a_time(n: int, window: int) -> None:
    order = epoch_order(n, seed=0, epoch=1, positions=np.arange(n), shuffle_window=window)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    if window < n:
        # Each window's positions hold consecutive sequences modulo n (an arc: the window grid is rotated by a
        # keyed offset per epoch, so one window may wrap around the end); the partial window comes last.
        full = n // window * window
        for chunk in [*np.split(order[:full], n // window), order[full:]]:
            if len(chunk):
                values = np.sort(chunk)
                gaps = np.sort(np.diff(np.append(values, values[0] + n)))
                assert (gaps[:-1] == 1).all(), chunk


def test_any_points_of_the_permutation_agree_with_the_whole() -> None:
    perm = KeyedPermutation(10_007, key=12345)
    whole = perm(np.arange(10_007))
    points = np.array([10_006, 0, 5000, 5000, 17])
    np.testing.assert_array_equal(perm(points), whole[points])
    with pytest.raises(DataError, match=r"permutation points must lie in \[0, 10007\), got \[0, 10007\]"):
        perm(np.array([0, 10_007]))


# ---- (c) world sizes 1, 2, 3 consume the reference stream -------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _fmix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    k = 0
    for p in parts:
        k = _splitmix64(k ^ p)
    return k


def _reference_permute(n: int, key: int, x: int, tweak: int | None = None) -> int:
    """The documented Feistel + cycle-walking bijection, one point at a time in Python integers."""
    half = max(1, -(-(n - 1).bit_length() // 2))
    mask = (1 << half) - 1
    keys, k = [], key
    for _ in range(6):
        k = _splitmix64(k)
        keys.append(k)
    t = 0 if tweak is None else _fmix(tweak)
    while True:
        left, right = x >> half, x & mask
        for rk in keys:
            left, right = right, left ^ (_fmix(right ^ rk ^ t) & mask)
        x = (left << half) | right
        if x < n:
            return x


def reference_stream(n: int, seed: int, positions: range, window: int = 0) -> list[int]:
    out = []
    for p in positions:
        epoch, pos = divmod(p, n)
        if window == 0 or window >= n:
            out.append(_reference_permute(n, _key(seed, epoch, 0), pos))
            continue
        full = n // window * window
        if pos < full:
            w = _reference_permute(n // window, _key(seed, epoch, 1), pos // window)
            idx = w * window + _reference_permute(window, _key(seed, epoch, 2), pos % window, tweak=w)
        else:
            idx = full + _reference_permute(n - full, _key(seed, epoch, 3), pos - full)
        out.append((idx + _key(seed, epoch, 4) % n) % n)
    return out


@pytest.mark.parametrize("window", [0, 8])
def test_world_sizes_1_2_3_consume_the_reference_stream_across_epochs(tmp_path: Path, window: int) -> None:
    rows = random_rows(50, 9, seed=4)
    data = write_data(tmp_path, [rows[:20], rows[20:33], rows[33:]])
    batch, steps, seed = 6, 12, 11  # 72 positions: epoch 0, then 22 of epoch 1 (step 8 straddles)
    reference = np.array(reference_stream(50, seed, range(batch * steps), window))
    for world_size in (1, 2, 3):
        ds = TokenDataset(data, shuffle_window=window, cache_bytes=1 << 20)
        consumed_idx, consumed_rows = [], []
        for step in range(steps):
            parts = [rank_batch(ds, seed, step * batch, batch, r, world_size) for r in range(world_size)]
            consumed_idx += [p[0] for p in parts]
            consumed_rows += [p[1] for p in parts]
        np.testing.assert_array_equal(np.concatenate(consumed_idx), reference)
        np.testing.assert_array_equal(np.concatenate(consumed_rows), rows[reference].astype(np.int64))
    np.testing.assert_array_equal(stream_indices(50, seed, 45, 10, window), reference[45:55])


# ---- (d) rows are the rows written ---------------------------------------------------------------------

def test_rows_equal_the_rows_written_across_batch_and_shard_boundaries(tmp_path: Path) -> None:
    width = 5
    shards = [random_rows(n, width, seed=10 + i) for i, n in enumerate([BATCH_ROWS * 2 + 100, 3, BATCH_ROWS + 1])]
    whole = np.concatenate(shards)
    data = write_data(tmp_path, shards)
    paths = read_manifest(data).shard_paths("train")
    reader = ShardReader(paths[0])
    assert reader.num_batches == 3 and reader.batch_offsets.tolist() == [0, BATCH_ROWS, 2 * BATCH_ROWS,
                                                                           2 * BATCH_ROWS + 100]
    np.testing.assert_array_equal(reader.rows(BATCH_ROWS - 2, BATCH_ROWS + 3), shards[0][BATCH_ROWS - 2:BATCH_ROWS + 3])
    for path, rows in zip(paths, shards, strict=True):
        np.testing.assert_array_equal(read_token_shard(path), rows)

    ds = TokenDataset(data, cache_bytes=BATCH_ROWS * width * 4)  # one batch: every boundary evicts
    first = BATCH_ROWS * 2 + 100
    edges = [0, BATCH_ROWS - 1, BATCH_ROWS, first - 1, first, first + 2, first + 3, first + 3 + BATCH_ROWS,
             len(whole) - 1]
    np.testing.assert_array_equal(ds.get(np.array(edges)), whole[edges].astype(np.int64))
    span = np.arange(first - 5, first + 3 + 5)  # end of shard 0, all of shard 1, start of shard 2
    np.testing.assert_array_equal(ds.get(span), whole[span].astype(np.int64))
    idx = np.random.default_rng(5).integers(0, len(whole), 3000)
    np.testing.assert_array_equal(ds.get(idx), whole[idx].astype(np.int64))
    assert ds.cache.peak_bytes <= BATCH_ROWS * width * 4


# ---- (e) the same rows through a pyarrow filesystem ------------------------------------------------------

def test_rows_read_through_filesystems_and_uris_are_the_same(tmp_path: Path) -> None:
    shards = [random_rows(BATCH_ROWS + 500, 7, seed=20), random_rows(40, 7, seed=21)]
    data = write_data(tmp_path / "data", shards, validation=random_rows(9, 7, seed=22))
    whole = np.concatenate(shards)
    idx = np.array([BATCH_ROWS + 539, 0, BATCH_ROWS, BATCH_ROWS + 499, BATCH_ROWS + 500, 17])

    # A file:// URI: local, so memory-mapped.
    uri = TokenDataset(f"file://{data}")
    assert uri.manifest.root == f"file://{data}" and uri._reader(0).memory_mapped
    np.testing.assert_array_equal(uri.get(idx), whole[idx])

    # A filesystem that is not the local one: SubTreeFileSystem over the directory takes the path that s3://
    # and gs:// take (open_input_file, record batches fetched one by one) ...
    subtree = pafs.SubTreeFileSystem(str(data), pafs.LocalFileSystem())
    ds = TokenDataset("", filesystem=subtree)
    reader = ds._reader(0)
    assert not reader.memory_mapped and reader.location == "subtree://tokens/train/part-00000.arrow"
    np.testing.assert_array_equal(ds.get(idx), whole[idx])
    assert reader._reader is not None and reader._reader.stats.num_record_batches == 2  # only the batches read
    np.testing.assert_array_equal(read_token_shard("tokens/validation/part-00000.arrow", subtree),
                                  read_token_shard(data / "tokens/validation/part-00000.arrow"))

    # ... and an in-memory filesystem (pyarrow's mock, standing in for a cloud store's bytes).
    mock = pafs._MockFileSystem()
    pafs.copy_files(str(data), "bucket/data", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=mock)
    in_memory = TokenDataset("bucket/data", filesystem=mock)
    np.testing.assert_array_equal(in_memory.get(idx), whole[idx])
    assert read_manifest("bucket/data", mock).shard_paths("train") == ["bucket/data/tokens/train/part-00000.arrow",
                                                                        "bucket/data/tokens/train/part-00001.arrow"]


def test_batch_sizes_come_from_the_footer_and_a_shard_without_them_is_still_read(tmp_path: Path) -> None:
    rows = random_rows(BATCH_ROWS + 3, 4, seed=30)
    plain = tmp_path / "plain.arrow"  # another writer: no batch sizes in the schema metadata, uneven batches
    column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 4)
    table = pa.table({"tokens": column})
    with pa.OSFile(str(plain), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    reader = ShardReader("plain.arrow", fs)
    assert reader.num_batches == 9 and reader.batch_offsets[-1] == BATCH_ROWS + 3
    np.testing.assert_array_equal(reader.rows(995, 2005), rows[995:2005])

    write_token_shard(tmp_path / "ours.arrow", rows)
    ours = ShardReader("ours.arrow", fs)
    assert ours.batch_offsets.tolist() == [0, BATCH_ROWS, BATCH_ROWS + 3]
    assert ours._reader is not None and ours._reader.stats.num_record_batches == 0  # footer only


# ---- (f) clear errors -----------------------------------------------------------------------------------

def test_missing_shard_and_wrong_schema_raise_data_errors(tmp_path: Path) -> None:
    rows = random_rows(30, 9, seed=40)
    data = write_data(tmp_path / "data", [rows[:10], rows[10:]])
    ds = TokenDataset(data)
    (data / "tokens/train/part-00001.arrow").unlink()
    with pytest.raises(DataError, match=r"lists 1 shard\(s\) that do not exist, e\.g\. \[.*part-00001\.arrow'\]"):
        read_manifest(data)
    with pytest.raises(DataError, match=r"token shard .*part-00001\.arrow does not exist; prepare the data again"):
        ds.get(np.array([15]))
    with pytest.raises(DataError, match=r"no manifest.json in .*nowhere"):
        TokenDataset(f"file://{tmp_path}/nowhere")

    bad = tmp_path / "data/tokens/train/part-00001.arrow"
    pa.ipc.new_file(pa.OSFile(str(bad), "wb"), pa.schema([("tokens", pa.list_(pa.int64(), 9))])).close()
    with pytest.raises(DataError, match=r"has schema \(tokens: fixed_size_list<item: int64>\[9\]\); expected one "
                                        r"fixed-size list column 'tokens' of uint32"):
        TokenDataset(data).get(np.array([15]))
    write_token_shard(bad, rows[10:, :5])  # right type, wrong seq_len
    with pytest.raises(DataError, match=r"holds shape \(20, 5\); the manifest says \(20, 9\)"):
        TokenDataset(data).get(np.array([15]))
    bad.write_bytes(b"not an arrow file")
    with pytest.raises(DataError, match="cannot be opened as an Arrow IPC file"):
        read_token_shard(bad)
    with pytest.raises(DataError, match=r"sequence indices \[0, 30\] outside \[0, 30\), the 'train' split's"):
        ds.get(np.array([0, 30]))
    with pytest.raises(DataError, match="pyarrow has no filesystem for this URI"):
        read_manifest("nosuchscheme://bucket/data")

"""The index-addressed training data: memory-mapped token shards read in a seeded, world-size-free order.

DESIGN.md "Deterministic data order": the train split's sequences form one global index space across its
shards (shard order from the manifest). The sample stream is epoch 0's permutation, then epoch 1's, ...,
each a seeded permutation of all sequences (seed (seed, epoch)). A step consumes the next ``B`` stream
positions, ``[consumed, consumed + B)``; rank ``r`` of ``W`` takes the contiguous slice
``[consumed + r * B / W, consumed + (r + 1) * B / W)``. Nothing depends on W, so restarting, or resuming at
another worker count, continues the same sample sequence (Ray Data cannot skip to a position; this can).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from aquila_ray.errors import DataError
from aquila_ray.train.shards import Manifest, read_manifest, read_token_shard


class TokenDataset:
    """Random access to one split's sequences by global index; shards are memory-mapped on first use."""

    def __init__(self, data_dir: str | Path, split: str = "train", manifest: Manifest | None = None) -> None:
        self.manifest = manifest or read_manifest(data_dir)
        if split not in self.manifest.splits or self.manifest.splits[split].num_sequences == 0:
            counts = {k: v.num_sequences for k, v in self.manifest.splits.items()}
            raise DataError(f"split {split!r} has no sequences in {data_dir}/manifest.json (sequences per split: "
                            f"{counts}); prepare data with python -m jobs.prepare_data")
        self.split = split
        self.seq_len = self.manifest.seq_len
        self.paths = self.manifest.shard_paths(split)
        sizes = [f.num_sequences for f in self.manifest.splits[split].files]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # shard i holds [off[i], off[i+1])
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._shards:
            rows = read_token_shard(self.paths[i])
            expected = int(self.offsets[i + 1] - self.offsets[i])
            if rows.shape != (expected, self.seq_len + 1):
                raise DataError(f"token shard {self.paths[i]} holds shape {rows.shape}; the manifest says "
                                f"({expected}, {self.seq_len + 1})")
            self._shards[i] = rows
        return self._shards[i]

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Rows for global indices, in the given order: (n, seq_len + 1) int64."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            out[sel] = self._shard(int(s))[idx[sel] - self.offsets[s]]
        return out


@lru_cache(maxsize=4)
def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of epoch ``epoch`` (PCG64 seeded with (seed, epoch): stable across numpy)."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_sequences)


def stream_indices(num_sequences: int, seed: int, start: int, count: int) -> np.ndarray:
    """Global sequence indices at sample-stream positions ``[start, start + count)`` (wrapping epochs)."""
    pos = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(pos, num_sequences)
    out = np.empty(count, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(num_sequences, seed, int(e))[offsets[sel]]
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
    idx = stream_indices(len(dataset), seed, start, count)
    return idx, dataset.get(idx)

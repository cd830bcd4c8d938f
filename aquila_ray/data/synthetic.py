"""Small synthetic token shards with a learnable pattern, for tests, benchmarks and smoke runs.

Each sequence is an arithmetic progression modulo the vocabulary, ``t[i+1] = (t[i] + d) % V`` with a random
start and a stride ``d`` in [1, 8): a model lowers its loss within a few steps, so "loss goes down" tests
are quick. Written with the real shard format (``aquila_ray.data.shards``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aquila_ray.data.shards import Manifest, ShardInfo, SplitInfo, write_manifest, write_token_shard


def write_synthetic_shards(directory: str | Path, num_train: int = 256, num_validation: int = 32, seq_len: int = 32,
                           vocab_size: int = 512, num_shards: int = 3, seed: int = 0) -> Path:
    """Write ``manifest.json`` and ``tokens/{train,validation}/*.arrow``; returns the directory."""
    d = Path(directory)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n, k in (("train", num_train, num_shards), ("validation", num_validation, 1)):
        start = rng.integers(0, vocab_size, n)[:, None]
        stride = rng.integers(1, 8, n)[:, None]
        rows = (start + stride * np.arange(seq_len + 1)[None, :]) % vocab_size
        files = []
        for j, part in enumerate(np.array_split(rows, k)):
            rel = f"tokens/{split}/synthetic-{j:05d}.arrow"
            write_token_shard(d / rel, part)
            files.append(ShardInfo(rel, len(part)))
        splits[split] = SplitInfo(files)
    write_manifest(d, Manifest(seq_len=seq_len, vocab_size=vocab_size, tokenizer_sha256="synthetic", splits=splits))
    return d

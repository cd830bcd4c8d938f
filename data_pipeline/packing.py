"""Packing: tokenized documents (ids ending in EOS) -> fixed-length ``seq_len + 1`` rows -> one token shard.

Documents are concatenated in a fixed order (copy index, then document order), so a shard's content does
not depend on Ray's scheduling; the stream is cut into consecutive, non-overlapping rows of
``seq_len + 1`` tokens and the last row is padded with EOS. Concatenating a shard's rows therefore gives
back exactly its documents separated by EOS (what the tests decode). This is the GPT-2/nanoGPT
"concatenate and chunk" packing; the shard file format is ``aquila_ray.train.shards``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads

from aquila_ray.train.shards import write_token_shard


def pack(ids: list[np.ndarray], seq_len: int, pad_id: int) -> np.ndarray:
    """Concatenate ``ids`` and cut into (N, seq_len + 1) rows; the tail row is padded with ``pad_id``."""
    width = seq_len + 1
    stream = np.concatenate(ids).astype(np.uint32) if ids else np.zeros(0, dtype=np.uint32)
    n = -(-stream.size // width)
    out = np.full(n * width, pad_id, dtype=np.uint32)
    out[:stream.size] = stream
    return out.reshape(n, width)


def pack_shard(tokenized_dir: str, split: str, shard: int, seq_len: int, eos_id: int,
               out_path: str) -> dict[str, Any]:
    """Read one (split, shard) group of the tokenized documents, pack it, write it (atomically)."""
    dataset = pads.dataset(tokenized_dir, format="parquet")
    cond = (pads.field("split") == split) & (pads.field("shard") == shard)
    table = dataset.to_table(columns=["order", "source", "copies", "ids"], filter=cond)
    rows = table.to_pydict()
    pieces: list[tuple[int, int, np.ndarray, str]] = []
    for order, source, copies, ids in zip(rows["order"], rows["source"], rows["copies"], rows["ids"], strict=True):
        arr = np.asarray(ids, dtype=np.uint32)
        for c in range(int(copies)):
            pieces.append((c, int(order), arr, source))
    pieces.sort(key=lambda p: (p[0], p[1]))
    tokens_per_source: Counter[str] = Counter()
    for _, _, arr, source in pieces:
        tokens_per_source[source] += int(arr.size)
    result: dict[str, Any] = {"split": split, "shard": shard, "path": None, "num_sequences": 0,
                              "num_documents": len(pieces), "tokens_per_source": dict(tokens_per_source),
                              "num_padding": 0}
    if not pieces:
        return result
    seqs = pack([p[2] for p in pieces], seq_len, eos_id)
    write_token_shard(out_path, seqs)
    result.update(path=str(Path(out_path)), num_sequences=int(seqs.shape[0]),
                  num_padding=int(seqs.size - sum(tokens_per_source.values())))
    return result

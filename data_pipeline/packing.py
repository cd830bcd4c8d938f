"""Packing: tokenized documents (ids ending in EOS) -> fixed-length ``seq_len + 1`` rows -> one token shard.

Documents are concatenated in a fixed order (copy index, then document order), so a shard's content does
not depend on Ray's scheduling; the stream is cut into consecutive, non-overlapping rows of
``seq_len + 1`` tokens and the last row is padded with EOS. Concatenating a shard's rows therefore gives
back exactly its documents separated by EOS (what the tests decode). This is the GPT-2/nanoGPT
"concatenate and chunk" packing; the shard file format is ``aquila_ray.data.shards``.
The pipeline groups the tokenized documents by (split, shard) with one Ray Data ``groupby``, so a group is
one shard's documents (about ``pack.target_shard_bytes``) and no task rescans the tokenized set.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aquila_ray.data.shards import write_token_shard
from data_pipeline.output import Output


def pack(ids: list[np.ndarray], seq_len: int, pad_id: int) -> np.ndarray:
    """Concatenate ``ids`` and cut into (N, seq_len + 1) rows; the tail row is padded with ``pad_id``."""
    width = seq_len + 1
    stream = np.concatenate(ids).astype(np.uint32) if ids else np.zeros(0, dtype=np.uint32)
    n = -(-stream.size // width)
    out = np.full(n * width, pad_id, dtype=np.uint32)
    out[:stream.size] = stream
    return out.reshape(n, width)


def pack_group(table: pa.Table, seq_len: int, eos_id: int, out: Output, rel: str) -> dict[str, Any]:
    """Pack one (split, shard) group of tokenized documents (columns order, source, copies, ids) and write
    it atomically to ``out/rel``; the pipeline calls it from ``groupby(split, shard).map_groups``, so every
    tokenized row is read once. A shard whose file already exists (a rerun after a crash) is counted, not rewritten."""
    ids = pa.concat_arrays(table.column("ids").chunks) if table.num_rows else pa.array([], pa.list_(pa.uint32()))
    values = ids.flatten().to_numpy()  # zero-copy view of the group's tokens (one shard, bounded by config)
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    orders = table.column("order").to_numpy()
    copies = table.column("copies").to_numpy().astype(np.int64)
    sources = table.column("source").to_pylist()
    pieces: list[np.ndarray] = []
    for c in range(int(copies.max()) if copies.size else 0):  # copy 0 of every document, then copy 1, ...
        rows = np.flatnonzero(copies > c)
        pieces += [values[starts[i]:starts[i] + lengths[i]] for i in rows[np.argsort(orders[rows], kind="stable")]]
    tokens_per_source: Counter[str] = Counter()
    for source, n, k in zip(sources, lengths.tolist(), copies.tolist(), strict=True):
        if k:
            tokens_per_source[source] += n * k
    result: dict[str, Any] = {"path": None, "num_sequences": 0, "num_documents": len(pieces),
                              "tokens_per_source": dict(tokens_per_source), "num_padding": 0}
    if not pieces:
        return result
    width = seq_len + 1
    num_tokens = sum(tokens_per_source.values())
    num_sequences = -(-num_tokens // width)
    if not out.is_file(rel):
        write_token_shard(out.path(rel), pack(pieces, seq_len, eos_id), filesystem=out.fs)
    result.update(path=out.uri(rel), num_sequences=num_sequences,
                  num_padding=num_sequences * width - num_tokens)
    return result

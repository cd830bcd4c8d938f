"""Bilingual byte-level BPE with Hugging Face ``tokenizers``: train, load, hash, and the tokenize step.

Byte-level BPE (GPT-2, Qwen, Aquila) covers any UTF-8 text with no unknown token; digits can be split one
by one (LLaMA, Qwen) so numbers do not become arbitrary merges. No normalizer: the pipeline already
normalized the text, and decode(encode(text)) == text holds exactly, which the tests check.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aquila_ray.errors import DataError
from data_pipeline.config import DataConfig, TokenizerConfig


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE of ``config.vocab_size`` (special tokens first) on ``texts``."""
    tok = Tokenizer(models.BPE())
    pre: list[Any] = []
    if config.split_digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    pre.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=list(config.special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> str:
    """Write tokenizer.json atomically; returns its sha256."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return file_sha256(path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise DataError(f"cannot load tokenizer {str(path)!r}: {e}") from e


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def eos_id(tok: Tokenizer, eos_token: str) -> int:
    tid = tok.token_to_id(eos_token)
    if tid is None:
        raise DataError(f"tokenizer has no token {eos_token!r} to separate documents; set tokenizer.eos_token "
                        f"to one of its special tokens")
    return int(tid)


class Tokenize:
    """Step: encode ``text`` with ``encode_batch`` (Rust, parallel) and append EOS; adds ``ids`` (uint32
    arrays) and ``num_tokens``. Setup (loading tokenizer.json) happens once per actor."""

    name = "tokenize"

    def __init__(self, tokenizer_path: str, eos_token: str) -> None:
        self.tok = load_tokenizer(tokenizer_path)
        self.eos = eos_id(self.tok, eos_token)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts = [str(t) for t in batch["text"]]
        encs = self.tok.encode_batch_fast(texts, add_special_tokens=False) if texts else []
        ids = np.empty(len(texts), dtype=object)
        lengths = np.zeros(len(texts), dtype=np.int64)
        for i, e in enumerate(encs):
            arr = np.empty(len(e.ids) + 1, dtype=np.uint32)
            arr[:-1] = e.ids
            arr[-1] = self.eos
            ids[i] = arr
            lengths[i] = arr.size
        out = {k: v for k, v in batch.items() if k != "text"}
        out["nchars"] = np.asarray([len(t) for t in texts], dtype=np.int64)
        out["ids"] = ids
        out["num_tokens"] = lengths
        return out


def train_tokenizer_from_inputs(config: DataConfig, output: str | Path) -> Path:
    """Train the tokenizer on the raw inputs of ``config`` (valid records, NFKC, no filtering or dedup) and
    write it to ``output``; what ``jobs.train_tokenizer`` runs. ``prepare_data`` instead trains on clean/."""
    import unicodedata

    from data_pipeline.readers import plan_inputs, read_file

    budget = config.tokenizer.max_train_chars

    def texts() -> Iterable[str]:
        used = 0
        for f in plan_inputs(config):
            for batch in read_file(f, config.max_doc_bytes):
                for text, reason in zip(batch["text"], batch["reason"], strict=True):
                    if reason:
                        continue
                    text = unicodedata.normalize("NFKC", text)[: budget - used]
                    used += len(text)
                    yield text
                    if used >= budget:
                        return

    tok = train_tokenizer(texts(), config.tokenizer)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, out)
    return out

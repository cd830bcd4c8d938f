"""Bilingual byte-level BPE with Hugging Face ``tokenizers``: train, load, hash, and the tokenize step.

Byte-level BPE (GPT-2, Qwen, Aquila) covers any UTF-8 text with no unknown token; digits can be split one
by one (LLaMA, Qwen) so numbers do not become arbitrary merges. No normalizer: the pipeline already
normalized the text, and decode(encode(text)) == text holds exactly, which the tests check.

The training text of ``prepare_data`` is a stratified sample of the clean train split, drawn with Ray
Data (``sample_for_tokenizer``), so a corpus dominated by one language or source still gives a balanced
zh/en vocabulary (the concern behind Qwen's and Aquila's bilingual tokenizers). Three passes, none of which
brings per-document data to the driver beyond the sample itself:

1. one aggregation: characters and documents per (lang, source) stratum -> a table of #langs x #sources rows;
2. per stratum a character quota (the language's budget split over its sources) and a candidate rate a bit
   above quota / size; the rows with ``unit_hash(seed, order, "tokenizer")`` below it send (order, hash,
   nchars), not text, to the driver, which takes them by increasing hash until the quota is reached: the cut;
3. the rows at or below their stratum's cut stream their text to the trainer with ``iter_batches``.

So every stratum gets its quota, exceeded by less than its last document (the bottom-k priority sample of
Cohen & Kaplan; with the candidates' 2x margin a stratum ends short only with vanishing probability, and
then it keeps all its candidates), and the sample depends only on (seed, order), not on files or blocks.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aquila_ray.errors import DataError
from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.mixing import unit_hash
from data_pipeline.readers import plan_inputs, read_file

if TYPE_CHECKING:
    import ray.data

SALT = "tokenizer"
# Candidates: rate = min(1, CANDIDATE_MARGIN * quota / chars + CANDIDATE_EXTRA_DOCS / docs).
CANDIDATE_MARGIN = 2.0
CANDIDATE_EXTRA_DOCS = 16


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


def tokenizer_json(tok: Tokenizer) -> str:
    """The tokenizer.json text (what ``Tokenizer.save`` writes)."""
    return tok.to_str(pretty=True)


def save_tokenizer(tok: Tokenizer, path: str | Path) -> str:
    """Write tokenizer.json atomically; returns its sha256."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(tokenizer_json(tok), encoding="utf-8")
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

    def __init__(self, tokenizer: str | Path | Tokenizer, eos_token: str) -> None:
        self.tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
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


# ------------------------------------------------------------------------------------------------ the sample
@dataclass
class Stratum:
    """One (lang, source) of the clean train split and what the sample takes from it."""

    lang: str
    source: str
    chars: int
    """Characters of the stratum's train documents."""
    docs: int
    """Its train documents."""
    quota: float
    """Characters the sample should take (its share of the language's budget; >= chars means all)."""
    cut: tuple[float, int] | None = None
    """(hash, order) of the last document taken; None = every document (the quota covers the stratum)."""
    sample_chars: int = 0
    """Characters the sample takes."""
    sample_docs: int = 0
    """Documents the sample takes."""

    @property
    def key(self) -> tuple[str, str]:
        return self.lang, self.source


def language_budget(config: TokenizerConfig, lang: str) -> int:
    return config.sample_chars_by_lang.get(lang, config.sample_chars_per_lang)


def split_budget(budget: float, chars: dict[str, int], how: str) -> dict[str, float]:
    """A language's character budget over its sources. ``proportional``: one rate min(1, budget / total) for
    all; ``equal``: water-filling, each source min(its size, an equal share of what the smaller ones left)."""
    if how == "proportional":
        rate = min(1.0, budget / max(sum(chars.values()), 1))
        return {s: c * rate for s, c in chars.items()}
    out: dict[str, float] = {}
    left = float(budget)
    ordered = sorted(chars.items(), key=lambda kv: (kv[1], kv[0]))
    for i, (s, c) in enumerate(ordered):
        out[s] = min(float(c), left / (len(ordered) - i))
        left -= out[s]
    return out


def plan_strata(table: list[dict[str, Any]], config: TokenizerConfig) -> list[Stratum]:
    """Strata with quotas from the aggregated rows {lang, source, chars, docs} (sorted by lang, source)."""
    by_lang: dict[str, dict[str, tuple[int, int]]] = {}
    for row in table:
        by_lang.setdefault(str(row["lang"]), {})[str(row["source"])] = (int(row["chars"]), int(row["docs"]))
    strata = []
    for lang in sorted(by_lang):
        sources = by_lang[lang]
        quotas = split_budget(language_budget(config, lang), {s: c for s, (c, _) in sources.items()},
                              config.sample_source_split)
        for source in sorted(sources):
            chars, docs = sources[source]
            strata.append(Stratum(lang, source, chars, docs, quotas[source]))
    return strata


def _hashes(orders: Any, seed: int) -> np.ndarray:
    return np.fromiter((unit_hash(seed, int(o), SALT) for o in orders), dtype=np.float64, count=len(orders))


def _train_rows(batch: pa.Table) -> pa.Table:
    """Train rows with ``nchars`` (code points, as len(str)) computed from the text when clean/ lacks it."""
    batch = batch.filter(pc.equal(batch.column("split"), "train"))
    if "nchars" not in batch.column_names:
        batch = batch.append_column("nchars", pc.utf8_length(batch.column("text")).cast(pa.int64()))
    return batch.select(["order", "lang", "source", "nchars"])


def _block_counts(batch: pa.Table) -> pa.Table:
    """Characters and documents per (lang, source) of one block: the partial aggregate, a few rows."""
    # use_threads=False: Acero's threaded group_by fails now and then inside Ray workers ("thread index 10
    # is out of range [0, 10)", seen in the test suite); a block's few groups need no threads
    t = _train_rows(batch).group_by(["lang", "source"], use_threads=False).aggregate(
        [("nchars", "sum"), ("nchars", "count")])
    return t.rename_columns({"nchars_sum": "chars", "nchars_count": "docs"}).select(["lang", "source", "chars", "docs"])


def _candidates(batch: pa.Table, seed: int, rates: dict[tuple[str, str], float]) -> pa.Table:
    """Rows whose hash is below their stratum's candidate rate: (lang, source, order, u, nchars), no text."""
    u = _hashes(batch.column("order").to_numpy(), seed)
    keys = zip(batch.column("lang").to_pylist(), batch.column("source").to_pylist(), strict=True)
    keep = np.fromiter((h < rates.get(k, 0.0) for h, k in zip(u, keys, strict=True)), dtype=bool, count=len(u))
    return batch.append_column("u", pa.array(u, pa.float64())).filter(pa.array(keep))


def _selected(batch: pa.Table, seed: int, cuts: dict[tuple[str, str], tuple[float, int] | None]) -> pa.Table:
    """The sample's rows of a clean batch (train split, stratum present, (hash, order) <= the cut): text."""
    lang, source = batch.column("lang").to_pylist(), batch.column("source").to_pylist()
    split, order = batch.column("split").to_pylist(), batch.column("order").to_pylist()
    keep = np.zeros(batch.num_rows, dtype=bool)
    for i in range(batch.num_rows):
        key = (lang[i], source[i])
        if split[i] != "train" or key not in cuts:
            continue
        cut = cuts[key]
        keep[i] = cut is None or (unit_hash(seed, order[i], SALT), order[i]) <= cut
    return batch.select(["text"]).filter(pa.array(keep))


class TokenizerSample:
    """The stratified tokenizer sample of a clean dataset (see the module docstring): ``texts()`` streams it,
    ``stats()`` describes it (known before streaming, for stats.json's ``tokenizer``)."""

    def __init__(self, clean: ray.data.Dataset, strata: list[Stratum], seed: int, budgets: dict[str, int]) -> None:
        self.clean = clean
        self.strata = strata
        self.seed = seed
        self.budgets = budgets

    def texts(self, batch_size: int = 256) -> Iterator[str]:
        """The sampled documents' texts (order of arrival varies; BPE training counts words, so it does
        not depend on it). Only the sample crosses to the driver."""
        cuts = {s.key: s.cut for s in self.strata if s.sample_docs}
        if not cuts:
            return
        ds: Any = self.clean.select_columns(["order", "lang", "source", "split", "text"])
        ds = ds.map_batches(_selected, batch_format="pyarrow", fn_kwargs={"seed": self.seed, "cuts": cuts})
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            yield from batch.column("text").to_pylist()

    def stats(self) -> dict[str, Any]:
        """Per language: budget, available and sampled characters and documents, share of the sample; per
        stratum the same. Shares are of the sample's characters."""
        total = sum(s.sample_chars for s in self.strata)
        by_lang: dict[str, dict[str, Any]] = {}
        for s in self.strata:
            g = by_lang.setdefault(s.lang, {"budget": self.budgets[s.lang], "available_chars": 0,
                                            "available_docs": 0, "chars": 0, "docs": 0})
            g["available_chars"] += s.chars
            g["available_docs"] += s.docs
            g["chars"] += s.sample_chars
            g["docs"] += s.sample_docs
        for g in by_lang.values():
            g["share"] = round(g["chars"] / total, 6) if total else 0.0
        return {
            "method": "stratified by (lang, source): per language at most its budget, split over its sources; "
                      "documents by increasing unit_hash(mix.seed, order, 'tokenizer')",
            "seed": self.seed, "chars": total, "docs": sum(s.sample_docs for s in self.strata),
            "by_lang": by_lang,
            "strata": [{"lang": s.lang, "source": s.source, "available_chars": s.chars, "available_docs": s.docs,
                        "quota": round(min(s.quota, s.chars)), "chars": s.sample_chars, "docs": s.sample_docs}
                       for s in self.strata],
        }


def sample_for_tokenizer(clean: ray.data.Dataset, config: DataConfig) -> TokenizerSample:
    """Plan the stratified sample of ``clean`` (rows with order, lang, source, split, text, optionally nchars):
    one aggregation and one candidate pass run now; ``texts()`` runs the third pass."""
    # deferred: Ray Data (~1.4 s) only for the sample; training a tokenizer (jobs.train_tokenizer) runs without Ray
    from ray.data.aggregate import Sum

    tcfg, seed = config.tokenizer, config.mix.seed
    cols = ["order", "lang", "source", "split"]
    cols.append("nchars" if "nchars" in clean.schema().names else "text")
    projected: Any = clean.select_columns(cols)
    # Each block reduces itself to a few rows first, so the groupby shuffles a table of about
    # blocks x strata rows, for which one partition is plenty.
    counts = projected.map_batches(_block_counts, batch_format="pyarrow")
    table = counts.groupby(["lang", "source"], num_partitions=1).aggregate(
        Sum("chars", alias_name="chars"), Sum("docs", alias_name="docs")).take_all()
    strata = plan_strata(table, tcfg)
    train = projected.map_batches(_train_rows, batch_format="pyarrow")
    rates = {}
    for s in strata:
        if s.quota < s.chars:
            rates[s.key] = min(1.0, CANDIDATE_MARGIN * s.quota / s.chars + CANDIDATE_EXTRA_DOCS / s.docs)
        else:
            s.sample_chars, s.sample_docs = s.chars, s.docs  # the whole stratum, cut None
    if rates:
        found: dict[tuple[str, str], list[tuple[float, int, int]]] = {k: [] for k in rates}
        ds = train.map_batches(_candidates, batch_format="pyarrow", fn_kwargs={"seed": seed, "rates": rates})
        for b in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
            for lang, source, order, u, n in zip(*(b.column(c).to_pylist() for c in
                                                   ("lang", "source", "order", "u", "nchars")), strict=True):
                found[(lang, source)].append((u, order, n))
        for s in strata:
            if s.key not in rates:
                continue
            for u, order, n in sorted(found[s.key]):
                if s.sample_chars >= s.quota:
                    break
                s.sample_chars += n
                s.sample_docs += 1
                s.cut = (u, order)
    budgets = {s.lang: language_budget(tcfg, s.lang) for s in strata}
    return TokenizerSample(clean, strata, seed, budgets)

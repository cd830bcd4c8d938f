"""Typed configuration of the data pipeline (STYLE.md rule 3): one dataclass per step, checked on creation.

A config names the sources (globs + mixing weight), the per-language filter thresholds, the dedup
parameters, the tokenizer and the packing. ``sample_config()`` is the preset that runs on the bundled
sample corpus; YAML/JSON files are thin overlays on it (``load_data_config``). Threshold defaults follow
Gopher (Rae et al. 2021) / C4 / FineWeb as collected by datatrove and NeMo Curator for English, and
ChineseWebText (Chen et al. 2023) for Chinese.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aquila_ray.config.base import resolve, to_dict
from aquila_ray.errors import ConfigError

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
TERMS_DIR = Path(__file__).resolve().parent / "terms"


def _check(cond: bool, where: str, value: Any, valid: str) -> None:
    if not cond:
        raise ConfigError(f"{where}={value!r} is not valid; {valid}")


def _frac(where: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, where, value, "expected a fraction in [0, 1]")


@dataclass
class SourceConfig:
    name: str
    """Source name: recorded on every document, the key of mixing weights and of per-source stats."""
    paths: list[str]
    """Files or globs (``*``, ``?``, ``[..]``, ``**``) of JSONL (.jsonl, .json, plain or .gz/.bz2/.zst/.lz4),
    Parquet or HTML (.html, .htm): local paths or URIs of any pyarrow filesystem (``s3://bucket/dir/*.jsonl.gz``,
    ``gs://``, ``hdfs://``, ``file://``)."""
    weight: float | None = None
    """Mixing weight (relative share of characters in the train split); None keeps the source's natural size."""
    format: Literal["auto", "jsonl", "parquet", "html"] = "auto"
    """File format; ``auto`` picks it from the file name."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet) that holds the document text."""
    source_field: str | None = "source"
    """Field (JSONL) or column (Parquet) whose value, when it is a valid source name (a non-empty string of at
    most 128 characters without '/', whitespace or control characters), becomes that record's source instead
    of ``name``; other values fall back to ``name``. None: every record is ``name``. Sources found this way are
    counted in stats.json like configured ones and mixed at their natural size (no weight)."""

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "sources[].name", self.name,
               "expected a non-empty name without '/'")
        _check(self.source_field is None or bool(self.source_field), f"sources[{self.name}].source_field",
               self.source_field, "expected a field name, or null to ignore per-record sources")
        _check(bool(self.paths), f"sources[{self.name}].paths", self.paths, "expected at least one file or glob")
        if self.weight is not None:
            _check(self.weight > 0, f"sources[{self.name}].weight", self.weight, "expected a number > 0 or null")


@dataclass
class NormalizeConfig:
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFKC"
    """Unicode normalization form applied to every text (NFKC folds full-width ASCII, common in zh web text)."""
    traditional_to_simplified: bool = False
    """Convert Traditional to Simplified Chinese with OpenCC (``t2s``) after language id says zh."""


@dataclass
class LanguageConfig:
    keep: list[str] = field(default_factory=lambda: ["zh", "en"])
    """fastText lid.176 language codes to keep; everything else is dropped as ``lang.not_kept``."""
    min_score: float = 0.5
    """Minimum probability of the top language; below it the document is dropped as ``lang.low_score``."""
    max_chars: int = 2000
    """Characters of the document (from the start) fed to the classifier."""

    def __post_init__(self) -> None:
        _check(bool(self.keep), "language.keep", self.keep, "expected at least one language code, e.g. ['zh', 'en']")
        _frac("language.min_score", self.min_score)
        _check(self.max_chars > 0, "language.max_chars", self.max_chars, "expected > 0")


@dataclass
class EnglishQualityConfig:
    """Gopher quality + repetition rules, C4's line rules and FineWeb's, with the shared default thresholds."""

    min_words: int = 50
    """Gopher: fewer words is dropped (``quality.en_too_few_words``)."""
    max_words: int = 100_000
    """Gopher: more words is dropped (``quality.en_too_many_words``)."""
    min_mean_word_length: float = 3.0
    """Gopher: mean word length below this is dropped."""
    max_mean_word_length: float = 10.0
    """Gopher: mean word length above this is dropped."""
    max_symbol_word_ratio: float = 0.1
    """Gopher: ('#' + '...' + '…') per word above this is dropped."""
    max_bullet_lines: float = 0.9
    """Gopher: share of lines starting with a bullet above this is dropped."""
    max_ellipsis_lines: float = 0.3
    """Gopher: share of lines ending with an ellipsis above this is dropped."""
    min_alpha_words: float = 0.8
    """Gopher: share of words with at least one letter below this is dropped."""
    min_stop_words: int = 2
    """Gopher: fewer distinct English stop words (the, be, to, of, and, that, have, with) is dropped."""
    max_dup_line_fraction: float = 0.3
    """Gopher repetition: share of lines that duplicate an earlier line above this is dropped."""
    max_top_ngram_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    """Gopher repetition: share of characters in the most frequent word n-gram, per n."""

    def __post_init__(self) -> None:
        self.max_top_ngram_fraction = {int(k): float(v) for k, v in self.max_top_ngram_fraction.items()}
        _check(0 <= self.min_words <= self.max_words, "quality.en.min_words", self.min_words,
               f"expected 0 <= min_words <= max_words ({self.max_words})")
        _check(self.min_mean_word_length <= self.max_mean_word_length, "quality.en.min_mean_word_length",
               self.min_mean_word_length, f"expected <= max_mean_word_length ({self.max_mean_word_length})")
        for name in ("max_bullet_lines", "max_ellipsis_lines", "min_alpha_words", "max_dup_line_fraction"):
            _frac(f"quality.en.{name}", getattr(self, name))
        for n, v in self.max_top_ngram_fraction.items():
            _check(n >= 1, "quality.en.max_top_ngram_fraction", n, "n-gram sizes must be >= 1")
            _frac(f"quality.en.max_top_ngram_fraction[{n}]", v)


@dataclass
class ChineseQualityConfig:
    """Rules that fit Chinese (no word segmentation): ChineseWebText's length, line and CJK-share rules plus
    a character n-gram repetition rule in the spirit of Gopher's."""

    min_chars: int = 200
    """Fewer non-space characters is dropped (``quality.zh_too_short``); ChineseWebText uses 200."""
    max_chars: int = 2_000_000
    """More characters is dropped (``quality.zh_too_long``)."""
    min_mean_line_chars: float = 10.0
    """Mean characters per non-empty line below this is dropped (``quality.zh_short_lines``)."""
    min_cjk_fraction: float = 0.3
    """Share of CJK characters among non-space characters below this is dropped (``quality.zh_low_cjk``)."""
    ngram_size: int = 13
    """Character n-gram size for the repetition rule."""
    max_dup_ngram_fraction: float = 0.5
    """Share of characters covered by repeated character n-grams above this is dropped (``quality.zh_repetitive``)."""
    max_dup_line_fraction: float = 0.3
    """Share of lines that duplicate an earlier line above this is dropped (``quality.zh_dup_lines``)."""

    def __post_init__(self) -> None:
        _check(0 <= self.min_chars <= self.max_chars, "quality.zh.min_chars", self.min_chars,
               f"expected 0 <= min_chars <= max_chars ({self.max_chars})")
        _check(self.ngram_size >= 2, "quality.zh.ngram_size", self.ngram_size, "expected >= 2")
        for name in ("min_cjk_fraction", "max_dup_ngram_fraction", "max_dup_line_fraction"):
            _frac(f"quality.zh.{name}", getattr(self, name))


@dataclass
class QualityConfig:
    enabled: bool = True
    """Run the heuristic quality step at all."""
    en: EnglishQualityConfig = field(default_factory=EnglishQualityConfig)
    """Thresholds for documents identified as English."""
    zh: ChineseQualityConfig = field(default_factory=ChineseQualityConfig)
    """Thresholds for documents identified as Chinese."""


@dataclass
class ToxicConfig:
    enabled: bool = True
    """Run the toxic/explicit term filter."""
    term_files: dict[str, str] = field(default_factory=lambda: {
        "en": str(TERMS_DIR / "en.txt"), "zh": str(TERMS_DIR / "zh.txt")})
    """Language -> file with one term per line ('#' comments); bundled lists documented in terms/PROVENANCE.md."""
    max_matches: int = 0
    """A document with more term occurrences than this is dropped (``toxic.terms``); 0 = C4's any-match rule."""

    def __post_init__(self) -> None:
        _check(self.max_matches >= 0, "toxic.max_matches", self.max_matches, "expected >= 0")
        for lang, path in self.term_files.items():
            _check(Path(path).is_file(), f"toxic.term_files.{lang}", path, "expected an existing file")


def _default_tag_hosts() -> dict[str, str]:
    return {
        "wikipedia.org": "encyclopedia", "baike.baidu.com": "encyclopedia", "baike.sogou.com": "encyclopedia",
        "britannica.com": "encyclopedia",
        "github.com": "code", "gitee.com": "code", "gitlab.com": "code", "stackoverflow.com": "code",
        "arxiv.org": "academic", "cnki.net": "academic", "semanticscholar.org": "academic", "edu": "academic",
        "edu.cn": "academic", "ac.uk": "academic",
        "gov": "government", "gov.cn": "government", "gov.uk": "government",
        "reuters.com": "news", "bbc.co.uk": "news", "xinhuanet.com": "news", "people.com.cn": "news",
        "zhihu.com": "qa", "quora.com": "qa", "stackexchange.com": "qa",
    }


def _default_tag_keywords() -> dict[str, list[str]]:
    return {
        "code": [r"\bdef \w+\(", r"\bclass \w+\s*[:({]", r"#include\s*<", r"\bimport \w+", r"\bfunction\s*\w*\s*\(",
                 r"\breturn\b[^\n]*;", r"\b(?:public|private) static\b", r"=>\s*\{", r"```"],
        "academic": [r"\babstract\b", r"\barxiv\b", r"\bdoi:", r"\bet al\.", r"\bproceedings of\b",
                     r"\btheorem\b", "摘要", "关键词", "参考文献", "定理"],
        "news": [r"\breuters\b", r"\(ap\)", r"\bsaid on (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b",
                 r"\bcorrespondent\b", "新华社", "记者", "据报道", "日电"],
    }


@dataclass
class DomainTagConfig:
    """Rules that give every kept document a ``domain`` tag (a column, not a filter): the first rule that
    matches wins, in this order: ``sources`` (the record's source), ``hosts`` (its URL), ``keywords`` (its
    first ``keyword_chars`` characters), else ``default``. A ``--config`` overlay adds entries to (or replaces
    entries of) the default host and keyword tables; ``--set domain.tags.hosts={...}`` replaces a whole table."""

    enabled: bool = True
    """Compute the tag; off, every kept document is ``default``."""
    sources: dict[str, str] = field(default_factory=dict)
    """Source name -> domain, e.g. {wiki_zh: encyclopedia, the_stack: code}; checked first."""
    hosts: dict[str, str] = field(default_factory=_default_tag_hosts)
    """URL host suffix -> domain, matched on whole labels (``wikipedia.org`` matches ``zh.wikipedia.org``,
    ``gov`` matches ``nasa.gov``); the longest matching suffix wins."""
    keywords: dict[str, list[str]] = field(default_factory=_default_tag_keywords)
    """Domain -> regular expressions (case-insensitive; plain words for zh, which has no word boundaries).
    A document gets the domain with the most distinct patterns found, if at least ``min_keyword_hits``;
    ties go to the domain listed first."""
    keyword_chars: int = 2000
    """Characters of the text (from the start) the keyword rules look at."""
    min_keyword_hits: int = 2
    """Distinct patterns of one domain that must occur for the keyword rule to tag a document."""
    default: str = "general"
    """Domain of a document no rule matches."""

    def __post_init__(self) -> None:
        def name_ok(v: object) -> bool:
            return isinstance(v, str) and bool(v) and "/" not in v and not any(c.isspace() for c in v)

        valid = "expected a non-empty domain name without '/' or spaces, e.g. 'code'"
        _check(name_ok(self.default), "domain.tags.default", self.default, valid)
        for k, v in self.sources.items():
            _check(name_ok(v), f"domain.tags.sources.{k}", v, valid)
        self.hosts = {str(h).lower().strip(".").strip(): d for h, d in self.hosts.items()}
        for h, d in self.hosts.items():
            _check(bool(h), "domain.tags.hosts", h, "expected a host suffix such as 'wikipedia.org' or 'gov'")
            _check(name_ok(d), f"domain.tags.hosts.{h}", d, valid)
        for d, patterns in self.keywords.items():
            _check(name_ok(d), "domain.tags.keywords", d, valid)
            _check(isinstance(patterns, list) and all(isinstance(p, str) and p for p in patterns),
                   f"domain.tags.keywords.{d}", patterns, "expected a list of non-empty regular expressions")
            for pat in patterns:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ConfigError(f"domain.tags.keywords.{d}={pat!r} is not valid; not a regular expression "
                                      f"({e})") from e
        _check(self.keyword_chars > 0, "domain.tags.keyword_chars", self.keyword_chars, "expected > 0")
        _check(self.min_keyword_hits >= 1, "domain.tags.min_keyword_hits", self.min_keyword_hits, "expected >= 1")


@dataclass
class DomainConfig:
    blocked_domains: list[str] = field(default_factory=list)
    """Domains whose pages are dropped (``domain.blocked``); subdomains match too."""
    blocked_url_substrings: list[str] = field(default_factory=list)
    """URL substrings that drop a page (``domain.url_pattern``)."""
    tags: DomainTagConfig = field(default_factory=DomainTagConfig)
    """The ``domain`` tag of kept documents (counted in stats.json, a mixing key with ``mix.by: domain``)."""


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose normalized text equals an earlier document's (``dedup.exact``), across sources."""
    fuzzy: bool = True
    """MinHash-LSH near-duplicate removal (``dedup.near``), across sources."""
    ngram_size: int = 5
    """Character n-gram (shingle) size; characters work for zh and en without word segmentation."""
    num_bands: int = 20
    """LSH bands; a pair becomes a candidate when all rows of one band agree."""
    rows_per_band: int = 10
    """Hashes per band; num_bands * rows_per_band permutations in all."""
    threshold: float = 0.8
    """Candidates whose estimated Jaccard similarity (signature agreement) is below this are not duplicates."""
    seed: int = 1
    """Seed of the MinHash permutations."""

    def __post_init__(self) -> None:
        _check(self.ngram_size >= 1, "dedup.ngram_size", self.ngram_size, "expected >= 1")
        _check(self.num_bands >= 1, "dedup.num_bands", self.num_bands, "expected >= 1")
        _check(self.rows_per_band >= 1, "dedup.rows_per_band", self.rows_per_band, "expected >= 1")
        _frac("dedup.threshold", self.threshold)


@dataclass
class MixConfig:
    seed: int = 0
    """Seed of the (hash-based, order-independent) mixing and split decisions."""
    validation_fraction: float = 0.02
    """Share of kept documents held out, by document, as the validation split."""
    by: Literal["source", "domain"] = "source"
    """Mixing key: ``source`` uses ``sources[].weight``; ``domain`` uses ``domain_weights`` over the domain
    tags (AquilaMoE's corpus is mixed by domain)."""
    domain_weights: dict[str, float] = field(default_factory=dict)
    """With ``by: domain``: relative share of train characters per domain tag; domains not listed keep their
    natural size and the listed ones share the rest."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.validation_fraction < 1.0, "mix.validation_fraction", self.validation_fraction,
               "expected a fraction in [0, 1)")
        _check(self.by in ("source", "domain"), "mix.by", self.by, "expected 'source' or 'domain'")
        bad = {k: v for k, v in self.domain_weights.items() if not (isinstance(v, int | float) and v > 0)}
        _check(not bad, "mix.domain_weights", bad, "expected a number > 0 per domain")
        _check(self.by == "domain" or not self.domain_weights, "mix.domain_weights", self.domain_weights,
               "only used with mix.by=domain; set mix.by=domain or remove them")


@dataclass
class TokenizerConfig:
    path: str | None = None
    """An existing tokenizer.json to use instead of training one."""
    vocab_size: int = 8192
    """Vocabulary size of the trained byte-level BPE (special tokens included)."""
    min_frequency: int = 2
    """BPE merges need a pair seen at least this often."""
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"])
    """Special tokens, added first (ids 0..)."""
    eos_token: str = "<|endoftext|>"
    """Separator appended after every document when packing; must be a special token."""
    split_digits: bool = True
    """Pre-tokenize digits one by one (LLaMA, Qwen)."""
    sample_chars_per_lang: int = 5_000_000
    """``prepare_data`` trains on a stratified sample of the clean train split: at most about this many
    characters per language (each language's sources share its budget, see ``sample_source_split``; a
    language with less text gives all of it). Documents are picked by a hash of (``mix.seed``, order), so the
    sample is reproducible and independent of file and block layout."""
    sample_chars_by_lang: dict[str, int] = field(default_factory=dict)
    """Per-language budgets that replace ``sample_chars_per_lang``, e.g. {zh: 60000000, en: 40000000}."""
    sample_source_split: Literal["proportional", "equal"] = "proportional"
    """How a language's budget is split over its sources: ``proportional`` to their size (the same rate for
    all), or ``equal`` shares (a source smaller than its share gives all of it, the rest is shared again)."""
    max_train_chars: int = 50_000_000
    """``jobs.train_tokenizer`` (raw inputs, no Ray): train on at most this many characters, in input order.
    ``prepare_data`` ignores it and uses the stratified sample above."""

    def __post_init__(self) -> None:
        if self.path is None:
            _check(self.vocab_size >= 256 + len(self.special_tokens), "tokenizer.vocab_size", self.vocab_size,
                   f"expected >= {256 + len(self.special_tokens)} (256 bytes + special tokens)")
            _check(self.eos_token in self.special_tokens, "tokenizer.eos_token", self.eos_token,
                   f"must be one of special_tokens {self.special_tokens}")
        else:
            _check(Path(self.path).is_file(), "tokenizer.path", self.path, "expected an existing tokenizer.json")
        _check(self.max_train_chars > 0, "tokenizer.max_train_chars", self.max_train_chars, "expected > 0")
        _check(self.sample_chars_per_lang > 0, "tokenizer.sample_chars_per_lang", self.sample_chars_per_lang,
               "expected > 0")
        bad = {k: v for k, v in self.sample_chars_by_lang.items() if not (isinstance(v, int) and v > 0)}
        _check(not bad, "tokenizer.sample_chars_by_lang", bad, "expected an integer > 0 per language")
        _check(self.sample_source_split in ("proportional", "equal"), "tokenizer.sample_source_split",
               self.sample_source_split, "expected 'proportional' or 'equal'")


@dataclass
class PackConfig:
    seq_len: int = 128
    """Tokens per training sequence; each stored row holds seq_len + 1 tokens."""
    target_shard_bytes: int = 1024**3
    """Size a token shard aims at (uint32 tokens): each split gets ceil(its stored bytes / this) shards,
    documents hashed into them. It bounds what one packing task holds, so it must fit a worker's memory."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 1, "pack.seq_len", self.seq_len, "expected >= 1")
        _check(self.target_shard_bytes >= 4 * (self.seq_len + 1), "pack.target_shard_bytes",
               self.target_shard_bytes, f"expected >= one row ({4 * (self.seq_len + 1)} bytes), e.g. 1073741824")


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    """Inputs, each a named set of files with an optional mixing weight."""
    output: str = "runs/data/sample"
    """Output directory (clean/, rejected/, stats.json, tokenizer.json, tokens/, manifest.json)."""
    max_doc_bytes: int = 10_000_000
    """Documents larger than this (UTF-8 bytes) are rejected as ``read.too_large``."""
    rejected_text_chars: int = 2000
    """rejected/ keeps at most this many characters of each dropped text (the full size is recorded)."""
    num_workers: int = 0
    """Actors per pool when ``ray_compute`` is ``actors``; 0 = one per CPU of the cluster (at least 1)."""
    shuffle_partitions: int = 0
    """Hash partitions of every Ray Data shuffle (dedup groupbys and joins, mixing, packing); 0 = two per
    cluster CPU. Raise it when a partition would not fit a worker's memory."""
    ray_compute: Literal["tasks", "actors"] = "tasks"
    """How Ray Data runs the filter and tokenize steps: ``tasks`` (no actor start-up; each worker process
    builds the step objects once and reuses them) or ``actors`` (an autoscaling actor pool)."""
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    """Unicode normalization."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    """Language identification."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Heuristic quality filters per language."""
    toxic: ToxicConfig = field(default_factory=ToxicConfig)
    """Toxic/explicit content removal."""
    domain: DomainConfig = field(default_factory=DomainConfig)
    """Domain / URL filter."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and MinHash-LSH deduplication."""
    mix: MixConfig = field(default_factory=MixConfig)
    """Mixing by source weights and the validation split."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer training or loading."""
    pack: PackConfig = field(default_factory=PackConfig)
    """Packing into fixed-length sequences."""

    def __post_init__(self) -> None:
        _check(bool(self.sources), "sources", self.sources, "expected at least one source")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, "sources[].name", dup, "source names must be unique")
        _check(bool(self.output), "output", self.output, "expected a directory")
        _check(self.max_doc_bytes > 0, "max_doc_bytes", self.max_doc_bytes, "expected > 0")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "expected >= 0 (0 = one per CPU)")
        _check(self.shuffle_partitions >= 0, "shuffle_partitions", self.shuffle_partitions,
               "expected >= 0 (0 = two per cluster CPU)")
        weights = [s.weight is None for s in self.sources]
        _check(all(weights) or not any(weights), "sources[].weight", [s.weight for s in self.sources],
               "give every source a weight, or none (natural proportions)")

    def fingerprint(self) -> str:
        """Hash of everything that changes the output (not the output path or the worker count)."""
        data = to_dict(self)
        data.pop("output")
        data.pop("num_workers")
        data.pop("shuffle_partitions")
        data.pop("ray_compute")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_sources() -> list[SourceConfig]:
    """The bundled sample corpus (data_pipeline/sample/PROVENANCE.md): real zh and en text from Debian."""
    return [
        SourceConfig("zh_poetry", [str(SAMPLE_DIR / "zh_poetry.jsonl.gz")], weight=None),
        SourceConfig("zh_manual", [str(SAMPLE_DIR / "zh_manual.jsonl.gz")], weight=None),
        SourceConfig("en_manual", [str(SAMPLE_DIR / "en_manual.jsonl.gz")], weight=None),
        SourceConfig("en_fortunes", [str(SAMPLE_DIR / "en_fortunes.jsonl.gz")], weight=None),
    ]


def sample_config(output: str = "runs/data/sample") -> DataConfig:
    """The preset the main job uses: the bundled sample corpus, a 4096-token BPE, 128-token sequences.

    The language-score floor is 0.3, not 0.5: the sample is mostly technical manuals full of shell commands,
    on which lid.176 spreads its probability (most of them score 0.2-0.5 yet are plainly zh or en)."""
    return DataConfig(sources=sample_sources(), output=output, language=LanguageConfig(min_score=0.3),
                      tokenizer=TokenizerConfig(vocab_size=4096), pack=PackConfig(seq_len=128))


def sources_from_inputs(inputs: list[str]) -> list[SourceConfig]:
    """``--input`` values -> sources. ``name=GLOB`` names the source; otherwise it is named after the file
    (``data/wiki_zh.jsonl.gz`` -> ``wiki_zh``) or, for a glob in the file name, after its folder."""
    out: list[SourceConfig] = []
    for raw in inputs:
        name, sep, pattern = raw.partition("=")
        if not sep or "/" in name or "*" in name:
            name, pattern = "", raw
        if not name:
            p = Path(pattern)
            name = p.parent.name if any(c in p.name for c in "*?[") else p.name.split(".")[0]
            name = name or "input"
        base, i = name, 1
        while any(s.name == name for s in out):
            i += 1
            name = f"{base}_{i}"
        out.append(SourceConfig(name=name, paths=[pattern]))
    return out


def load_data_config(config_file: str | None = None, overrides: list[str] | None = None,
                     inputs: list[str] | None = None, output: str | None = None) -> DataConfig:
    """``resolve(DataConfig, ...)``: sample_config() <- YAML/JSON overlay <- --input/--output <- ``a.b=value``
    overrides; errors before work. An overlay's max_top_ngram_fraction ({n: fraction}) replaces the default
    table instead of extending it."""
    flags: dict[str, Any] = {}
    if inputs:
        flags["sources"] = [to_dict(s) for s in sources_from_inputs(inputs)]
    if output:
        flags["output"] = output
    return resolve(DataConfig, sample_config(), config_file, overrides, flags,
                   whole=frozenset({"max_top_ngram_fraction"}))

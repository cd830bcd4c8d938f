"""Synthetic corpora with planted properties, for the tests and the benchmark.

Documents are seeded word (en, de, fr) or character (zh) salads drawn from real vocabularies: English words
and Chinese characters come from the bundled sample corpus, so the language identifier sees real words.
``make_planted_corpus`` writes JSONL/Parquet/HTML inputs with known numbers of exact and near duplicates,
other-language, toxic, low-quality, blocked-domain and broken records, and returns what each count must be.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import SAMPLE_DIR, TERMS_DIR
from data_pipeline.steps import load_terms

_STOP = ["the", "and", "of", "to", "that", "with", "have", "be", "is", "in", "for", "on", "it", "was"]
_DE = ("der die das und ist nicht ein eine zu mit von für auf über Haus Straße schön groß klein Wasser Kinder "
       "arbeiten spielen gestern heute morgen immer wieder sehr Zeit Leben Welt Stadt können müssen würde "
       "Mädchen Bücher lesen schreiben Freunde Geschichte zusammen Sonntag Frühling Bahnhof").split()
_FR = ("le la les et est pas un une de avec pour sur dans être avoir très maison rue beau grand petit eau "
       "enfants travailler jouer hier aujourd'hui demain toujours encore temps vie monde ville pouvoir devoir "
       "fille livres lire écrire amis histoire ensemble dimanche printemps gare nous vous ils").split()


@cache
def _toxic_words() -> frozenset[str]:
    return frozenset(w for term in load_terms(TERMS_DIR / "en.txt") for w in term.split())


@cache
def english_words() -> list[str]:
    """Words of the bundled English fortunes, minus every word of the toxic list (phrases included)."""
    bad = _toxic_words()
    words: set[str] = set()
    with gzip.open(SAMPLE_DIR / "en_fortunes.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            words.update(w for w in re.findall(r"[a-z]{4,10}", json.loads(line)["text"].lower()))
    return sorted(words - bad)


@cache
def chinese_sentences() -> list[str]:
    """Modern Chinese sentences of the bundled Debian reference (zh-cn) that are almost all CJK."""
    out: set[str] = set()
    with gzip.open(SAMPLE_DIR / "zh_manual.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            for sent in re.findall(r"[^。\n]{12,60}。", json.loads(line)["text"]):
                if len(re.findall(r"[\u4e00-\u9fff]", sent)) >= 0.8 * len(sent):
                    out.add(sent.strip())
    return sorted(out)


@cache
def chinese_chars() -> list[str]:
    return sorted({c for s in chinese_sentences() for c in s if "\u4e00" <= c <= "\u9fff"})


def en_doc(rng: random.Random, num_words: int = 120) -> str:
    vocab = english_words()
    stops = [w for w in _STOP if w not in _toxic_words()]
    lines, line, words = [], [], 0
    while words < num_words:
        n = rng.randint(8, 14)
        sent = [rng.choice(stops) if rng.random() < 0.3 else rng.choice(vocab) for _ in range(n)]
        line.append(" ".join(sent).capitalize() + ".")
        words += n
        if len(line) == 3:
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines)


def zh_doc(rng: random.Random, num_chars: int = 320) -> str:
    """Real modern Chinese sentences (distinct within a document) in a random order, three per line."""
    pool = chinese_sentences()
    sents: list[str] = []
    chars = 0
    for i in rng.sample(range(len(pool)), len(pool)):
        sents.append(pool[i])
        chars += len(pool[i])
        if chars >= num_chars:
            break
    return "\n".join("".join(sents[i:i + 3]) for i in range(0, len(sents), 3))


def other_doc(rng: random.Random, lang: str, num_words: int = 120) -> str:
    vocab = _DE if lang == "de" else _FR
    sents = [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 14))).capitalize() + "."
             for _ in range(num_words // 10)]
    return "\n".join(" ".join(sents[i:i + 3]) for i in range(0, len(sents), 3))


def near_duplicate(text: str, rng: random.Random, num_edits: int = 2) -> str:
    """Replace ``num_edits`` words (en) or characters (zh) with others: Jaccard stays well above 0.8."""
    if re.search(r"[\u4e00-\u9fff]", text):
        chars = list(text)
        pos = [i for i, c in enumerate(chars) if "\u4e00" <= c <= "\u9fff"]
        for i in rng.sample(pos, num_edits):
            chars[i] = rng.choice(chinese_chars())
        return "".join(chars)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), num_edits):
        words[i] = rng.choice(english_words())
    return " ".join(words)


@dataclass
class Planted:
    """What the pipeline must report for a corpus made by ``make_planted_corpus``."""

    inputs: list[str]
    total: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    kept_by_lang: dict[str, int] = field(default_factory=dict)
    blocked_domain: str = "spam.example"

    def add(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + n
        self.total += n


def make_planted_corpus(root: str | Path, seed: int = 0, num_en: int = 40, num_zh: int = 40,
                        big_doc_bytes: int = 0) -> Planted:
    """Write a mixed corpus under ``root`` and return its planted counts.

    Sources: ``web_en`` (JSONL, en + de/fr + broken lines), ``web_zh`` (JSONL.gz), ``books`` (Parquet,
    duplicates of web docs), ``pages`` (HTML), ``lost`` (a glob matching nothing)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    en = [en_doc(rng) for _ in range(num_en)]
    zh = [zh_doc(rng) for _ in range(num_zh)]
    p = Planted(inputs=[f"web_en={root}/en/*.jsonl", f"web_zh={root}/zh.jsonl.gz", f"books={root}/books.parquet",
                        f"pages={root}/pages/*.html", f"lost={root}/missing/*.jsonl"])
    p.kept = num_en + num_zh + 1  # + the HTML page
    p.kept_by_lang = {"en": num_en + 1, "zh": num_zh}
    p.total = p.kept
    # web_en: good en docs, other languages, low quality, toxic, blocked domain, broken records
    lines: list[bytes] = [json.dumps({"id": f"en-{i}", "text": t}).encode() for i, t in enumerate(en)]
    for lang in ("de", "fr"):
        for _ in range(3):
            lines.append(json.dumps({"text": other_doc(rng, lang)}, ensure_ascii=False).encode())
            p.add("lang.not_kept")
    lines.append(json.dumps({"text": "Too short to be a document, the end."}).encode())
    p.add("quality.en_too_few_words")
    lines.append(json.dumps({"text": en_doc(rng) + " What a bastard he was."}).encode())
    p.add("toxic.terms")
    lines.append(json.dumps({"text": en_doc(rng), "url": f"https://www.{p.blocked_domain}/page"}).encode())
    p.add("domain.blocked")
    lines.append(b'{"text": "broken json')
    p.add("read.broken_json")
    lines.append(json.dumps({"id": "no-text", "body": "x"}).encode())
    p.add("read.missing_text")
    lines.append(json.dumps({"text": 42}).encode())
    p.add("read.text_not_string")
    lines.append(json.dumps({"text": "   \n "}).encode())
    p.add("read.empty_text")
    lines.append(b'{"text": "caf\xe9 latin-1 bytes"}')
    p.add("read.invalid_utf8")
    lines.append(json.dumps([1, 2]).encode())
    p.add("read.not_an_object")
    if big_doc_bytes:
        lines.append(json.dumps({"id": "huge", "text": "word " * (big_doc_bytes // 5)}).encode())
        p.add("read.too_large")
    # near duplicates of en docs within the same source (later order -> the copy is dropped)
    for i in range(3):
        lines.append(json.dumps({"id": f"en-near-{i}", "text": near_duplicate(en[i], rng)}).encode())
        p.add("dedup.near")
    (root / "en").mkdir(exist_ok=True)
    (root / "en" / "part-0.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # web_zh (gzip): good zh docs, a too-short one, a toxic one, a near duplicate
    zl = [json.dumps({"id": f"zh-{i}", "text": t}, ensure_ascii=False) for i, t in enumerate(zh)]
    zl.append(json.dumps({"text": "太短了，不是一篇文章。"}, ensure_ascii=False))
    p.add("quality.zh_too_short")
    zl.append(json.dumps({"text": zh_doc(rng) + "点击进入色情网站。"}, ensure_ascii=False))
    p.add("toxic.terms")
    zl.append(json.dumps({"text": near_duplicate(zh[0], rng)}, ensure_ascii=False))
    p.add("dedup.near")
    with gzip.open(root / "zh.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(zl) + "\n")
    # books (Parquet): exact duplicates of web docs, across sources (case and spacing differ)
    dup_texts = [en[5].replace(" ", "  "), "  " + zh[3].replace("\n", "\n\n") + "  ", en[6]]
    pq.write_table(pa.table({"text": dup_texts, "id": ["b0", "b1", "b2"]}), root / "books.parquet")
    p.add("dedup.exact", len(dup_texts))
    # pages (HTML)
    (root / "pages").mkdir(exist_ok=True)
    body = "".join(f"<p>{line}</p>" for line in en_doc(rng).splitlines())
    (root / "pages" / "a.html").write_text(f"<html><head><title>t</title><script>var x = 1;</script></head>"
                                           f"<body>{body}</body></html>", encoding="utf-8")
    # lost: a pattern that matches nothing
    p.add("read.missing_file")
    return p

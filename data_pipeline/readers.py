"""Readers: input files -> batches of document records, one record per input record, valid or not.

Every record carries ``reason``: ``""`` while it is alive, else ``<step>.<detail>`` (datatrove's
``filter_reason`` idea, kept on the record so nothing is counted twice and every drop lands in
rejected/). Reading never raises on bad data: a broken JSON line, a missing or non-string ``text``,
empty text, invalid UTF-8, an oversized document, a missing or unreadable file each become one record
with a ``read.*`` reason. Inputs: JSONL (plain or .gz), Parquet, HTML pages (text extracted with the
standard library's HTMLParser, block elements become line breaks, script/style dropped).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from data_pipeline.config import DataConfig

Batch = dict[str, list[Any]]

# The record schema every step sees (columns of a batch).
COLUMNS = ("order", "id", "source", "url", "text", "nbytes", "lang", "lang_score", "reason")
READ_BATCH = 512
# order = file_index << ORDER_SHIFT | record_index: a global, deterministic document key.
ORDER_SHIFT = 32

READ_REASONS = ("broken_json", "not_an_object", "missing_text", "text_not_string", "empty_text", "invalid_utf8",
                "too_large", "missing_file", "unreadable_file")


@dataclass(frozen=True)
class InputFile:
    """One file to read (or a pattern that matched nothing: ``missing=True``)."""

    path: str
    source: str
    file_index: int
    format: str
    text_field: str = "text"
    missing: bool = False


def empty_batch() -> Batch:
    return {c: [] for c in COLUMNS}


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".html", ".htm", ".html.gz", ".htm.gz")):
        return "html"
    return "jsonl"


def plan_inputs(config: DataConfig) -> list[InputFile]:
    """Expand every source's globs, sorted, into numbered files; patterns that match nothing are kept as
    ``missing`` entries so the job reports them instead of failing."""
    files: list[InputFile] = []
    for src in config.sources:
        for pattern in src.paths:
            matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matches:
                files.append(InputFile(pattern, src.name, len(files), "missing", src.text_field, missing=True))
            for m in matches:
                files.append(InputFile(m, src.name, len(files), _format_of(m, src.format), src.text_field))
    return files


def _record(batch: Batch, f: InputFile, index: int, doc_id: str, text: str, nbytes: int, reason: str,
            url: str = "") -> None:
    batch["order"].append((f.file_index << ORDER_SHIFT) | index)
    batch["id"].append(doc_id)
    batch["source"].append(f.source)
    batch["url"].append(url)
    batch["text"].append(text)
    batch["nbytes"].append(nbytes)
    batch["lang"].append("")
    batch["lang_score"].append(0.0)
    batch["reason"].append(reason)


def _check_text(value: Any, max_bytes: int) -> tuple[str, int, str]:
    """(text, nbytes, reason) for a raw ``text`` value."""
    if value is None:
        return "", 0, "read.missing_text"
    if not isinstance(value, str):
        return "", 0, "read.text_not_string"
    try:
        nbytes = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from a JSON \ud800 escape
        return "", 0, "read.invalid_utf8"
    if nbytes > max_bytes:
        return value, nbytes, "read.too_large"
    if not value.strip():
        return "", 0, "read.empty_text"
    return value, nbytes, ""


def _open(path: str) -> Any:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _read_jsonl(f: InputFile, max_bytes: int) -> Iterator[tuple[int, str, str, int, str, str]]:
    """Yield (index, id, text, nbytes, reason, url) per line; blank lines are skipped (not records)."""
    index = 0
    with _open(f.path) as fh:
        for raw in fh:
            if not raw.strip():
                continue
            default_id = f"{f.source}/{Path(f.path).name}:{index}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield index, default_id, "", len(raw), "read.invalid_utf8", ""
                index += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield index, default_id, "", len(raw), "read.broken_json", ""
                index += 1
                continue
            if not isinstance(obj, dict):
                yield index, default_id, "", len(raw), "read.not_an_object", ""
                index += 1
                continue
            text, nbytes, reason = _check_text(obj.get(f.text_field), max_bytes)
            doc_id = str(obj["id"]) if obj.get("id") is not None else default_id
            raw_url = obj.get("url")
            yield index, doc_id, text, nbytes, reason, raw_url if isinstance(raw_url, str) else ""
            index += 1


def _read_parquet(f: InputFile, max_bytes: int) -> Iterator[tuple[int, str, str, int, str, str]]:
    pf = pq.ParquetFile(f.path)
    names = set(pf.schema_arrow.names)
    columns = [c for c in (f.text_field, "id", "url") if c in names]
    index = 0
    for rb in pf.iter_batches(batch_size=READ_BATCH, columns=columns or None):
        cols = rb.to_pydict()
        n = rb.num_rows
        texts = cols.get(f.text_field, [None] * n)
        ids = cols.get("id", [None] * n)
        urls = cols.get("url", [None] * n)
        for t, i, u in zip(texts, ids, urls, strict=True):
            text, nbytes, reason = _check_text(t, max_bytes)
            doc_id = str(i) if i is not None else f"{f.source}/{Path(f.path).name}:{index}"
            yield index, doc_id, text, nbytes, reason, u if isinstance(u, str) else ""
            index += 1


class _TextExtractor(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "section",
             "article", "dt", "dd", "blockquote", "title", "ul", "ol", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: one line per block element, runs of blank space collapsed."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _read_html(f: InputFile, max_bytes: int) -> Iterator[tuple[int, str, str, int, str, str]]:
    with _open(f.path) as fh:
        raw = fh.read()
    doc_id = f"{f.source}/{Path(f.path).name}"
    try:
        html = raw.decode("utf-8")
    except UnicodeDecodeError:
        yield 0, doc_id, "", len(raw), "read.invalid_utf8", ""
        return
    if len(raw) > max_bytes:
        yield 0, doc_id, html, len(raw), "read.too_large", ""
        return
    text, nbytes, reason = _check_text(html_to_text(html), max_bytes)
    yield 0, doc_id, text, nbytes, reason, ""


READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "html": _read_html}


def read_file(f: InputFile, max_doc_bytes: int, batch_size: int = READ_BATCH) -> Iterator[Batch]:
    """All records of one input file as batches; a missing or unreadable file is a record, not an error."""
    batch = empty_batch()
    if f.missing:
        _record(batch, f, 0, f.path, "", 0, "read.missing_file")
        yield batch
        return
    last = -1
    try:
        for index, doc_id, text, nbytes, reason, url in READERS[f.format](f, max_doc_bytes):
            _record(batch, f, index, doc_id, text, nbytes, reason, url)
            last = index
            if len(batch["order"]) >= batch_size:
                yield batch
                batch = empty_batch()
    except (OSError, EOFError, ValueError) as e:  # truncated gzip, not Parquet, permission denied, ...
        _record(batch, f, last + 1, f"{f.path}:{last + 1}", f"{type(e).__name__}: {e}", 0, "read.unreadable_file")
    if batch["order"]:
        yield batch


def read_files_batch(batch: dict[str, Any], max_doc_bytes: int) -> Iterator[Batch]:
    """Ray Data UDF: a batch of InputFile rows -> record batches (a generator, so memory stays bounded)."""
    for i in range(len(batch["path"])):
        f = InputFile(str(batch["path"][i]), str(batch["source"][i]), int(batch["file_index"][i]),
                      str(batch["format"][i]), str(batch["text_field"][i]), bool(batch["missing"][i]))
        yield from read_file(f, max_doc_bytes)

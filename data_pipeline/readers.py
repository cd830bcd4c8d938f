"""Readers: input files -> batches of document records, one record per input record, valid or not.

Every record carries ``reason``: ``""`` while it is alive, else ``<step>.<detail>`` (datatrove's
``filter_reason`` idea, kept on the record so nothing is counted twice and every drop lands in
rejected/). Reading never raises on bad data: a broken JSON line, a missing or non-string ``text``,
empty text, invalid UTF-8, an oversized document, a missing or unreadable file each become one record
with a ``read.*`` reason. Inputs: JSONL (plain, .gz, or another codec pyarrow detects from the name:
.bz2, .zst, .lz4), Parquet, HTML pages (text extracted with the standard library's HTMLParser, block
elements become line breaks, script/style dropped).

Locations are local paths or URIs of any pyarrow filesystem (``s3://``, ``gs://``, ``hdfs://``,
``file://``), with globs (``*``, ``?``, ``[..]`` within a name, ``**`` across folders) expanded by listing
the folder before the first glob with ``pyarrow.fs.FileSelector`` and matching names with ``fnmatch``,
as ``glob.glob(recursive=True)`` does (hidden names only match a pattern that starts with a dot).

A record's ``source`` is its source's ``name``, unless the record carries its own: the field (JSONL) or
column (Parquet) named by ``SourceConfig.source_field`` (``source`` by default) wins when its value is a
valid source name (``valid_source_name``: a non-empty string of at most 128 characters, no ``/``, no
whitespace or control characters); any other value (missing, null, a number, ``"a/b"``) falls back to the
configured name. The decision is per record and never drops it.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aquila_ray.errors import ConfigError, DataError
from data_pipeline.config import DataConfig

Batch = dict[str, list[Any]]

# The record schema every step sees (columns of a batch).
COLUMNS = ("order", "id", "source", "url", "text", "nbytes", "lang", "lang_score", "reason")
READ_BATCH = 512
# order = file_index << ORDER_SHIFT | record_index: a global, deterministic document key.
ORDER_SHIFT = 32

# A record's own source name: at most this long, no '/', no whitespace or control characters.
MAX_SOURCE_NAME = 128
_GLOB_CHARS = frozenset("*?[")

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
    source_field: str = "source"
    """Record field whose valid value overrides ``source`` for that record; "" = always ``source``."""


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


def _has_glob(part: str) -> bool:
    return any(c in _GLOB_CHARS for c in part)


def _is_uri(location: str) -> bool:
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.isidentifier()


def filesystem_of(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a local path or a URI (``s3://bucket/key``, ``file:///x``).
    Local paths stay as written (relative ones too; ``~`` is expanded)."""
    if not _is_uri(location):
        return pafs.LocalFileSystem(), os.path.expanduser(location)
    return pafs.FileSystem.from_uri(location)


def _match(parts: list[str], pattern: list[str]) -> bool:
    """glob.glob(recursive=True) semantics on path segments: ``**`` matches zero or more folders, every
    other segment is an fnmatch pattern; a hidden name (".x") only matches a segment that starts with '.'."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        if not rest:  # a trailing ** matches every file below
            return all(not p.startswith(".") for p in parts)
        return any(_match(parts[i:], rest) for i in range(len(parts))
                   if all(not p.startswith(".") for p in parts[:i]))
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _match(parts[1:], rest)


def expand_pattern(pattern: str) -> list[str]:
    """Every file a local path, URI or glob names, sorted, each spelled as the pattern is (a relative
    pattern gives relative paths, a URI gives URIs). Nothing found -> []. Raises ConfigError for a URI no
    pyarrow filesystem understands, DataError when the location cannot be reached or listed."""
    segments = pattern.split("/")
    first = next((i for i, seg in enumerate(segments) if _has_glob(seg)), len(segments))
    base = "/".join(segments[:first]) or ("/" if pattern.startswith("/") else "")
    if _is_uri(pattern) and base.count("/") < 3:  # "s3://bucket/*": the bucket is the base
        base = "/".join(segments[:max(first, 3)])
    try:
        fs, root = filesystem_of(base or ".")
    except (pa.ArrowInvalid, ValueError) as e:
        raise ConfigError(f"input {pattern!r} is not a location pyarrow can read ({e}); expected a local path "
                          f"or a URI such as s3://bucket/dir/*.jsonl.gz, gs://..., hdfs://..., file:///...") from e
    except OSError as e:
        raise DataError(f"cannot reach the filesystem of input {pattern!r}: {e}") from e
    try:
        if first == len(segments):  # no glob: one file, or nothing
            return [pattern] if fs.get_file_info(root).type == pafs.FileType.File else []
        globs = segments[first:]
        recursive = "**" in globs or len(globs) > 1
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DataError(f"cannot list input {pattern!r} (folder {root!r}): {e}") from e
    prefix = root.rstrip("/") + "/" if root not in ("", ".") else ""
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(prefix):] if prefix and info.path.startswith(prefix) else info.path
        rel = rel.removeprefix("./")
        if _match(rel.split("/"), globs):
            out.append(f"{base.rstrip('/')}/{rel}" if base else rel)
    return sorted(out)


def plan_inputs(config: DataConfig) -> list[InputFile]:
    """Expand every source's paths (local paths, URIs, globs) in config order, each pattern's files
    sorted, into numbered files; patterns that match nothing are kept as ``missing`` entries so the job
    reports them instead of failing."""
    files: list[InputFile] = []
    for src in config.sources:
        source_field = src.source_field or ""
        for pattern in src.paths:
            matches = expand_pattern(pattern)
            if not matches:
                files.append(InputFile(pattern, src.name, len(files), "missing", src.text_field, missing=True,
                                       source_field=source_field))
            for m in matches:
                files.append(InputFile(m, src.name, len(files), _format_of(m, src.format), src.text_field,
                                       source_field=source_field))
    return files


def valid_source_name(value: Any) -> bool:
    """Whether a record's own ``source`` value may replace the configured source name."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_SOURCE_NAME and "/" not in value
            and value.isprintable() and not any(c.isspace() for c in value))


def _file_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _record(batch: Batch, f: InputFile, index: int, doc_id: str, text: str, nbytes: int, reason: str,
            url: str = "", source: str = "") -> None:
    batch["order"].append((f.file_index << ORDER_SHIFT) | index)
    batch["id"].append(doc_id)
    batch["source"].append(source or f.source)
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
    """A binary, line-iterable stream of a local or remote file, decompressed. gzip goes through Python's
    gzip module on pyarrow's raw stream, so a truncated .gz still yields every line before the damage;
    other codecs (.bz2, .zst, .lz4) through pyarrow's decompression, detected from the name."""
    fs, inner = filesystem_of(path)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=fs.open_input_stream(inner, compression=None), mode="rb")
    return io.BufferedReader(fs.open_input_stream(inner), buffer_size=1 << 16)  # type: ignore[arg-type]


# (index, id, text, nbytes, reason, url, the record's own source or "")
Row = tuple[int, str, str, int, str, str, str]


def _own_source(f: InputFile, value: Any) -> str:
    return value if f.source_field and valid_source_name(value) else ""


def _read_jsonl(f: InputFile, max_bytes: int) -> Iterator[Row]:
    """Yield one Row per line; blank lines are skipped (not records)."""
    index = 0
    name = _file_name(f.path)
    with _open(f.path) as fh:
        for raw in fh:
            if not raw.strip():
                continue
            default_id = f"{f.source}/{name}:{index}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield index, default_id, "", len(raw), "read.invalid_utf8", "", ""
                index += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield index, default_id, "", len(raw), "read.broken_json", "", ""
                index += 1
                continue
            if not isinstance(obj, dict):
                yield index, default_id, "", len(raw), "read.not_an_object", "", ""
                index += 1
                continue
            text, nbytes, reason = _check_text(obj.get(f.text_field), max_bytes)
            doc_id = str(obj["id"]) if obj.get("id") is not None else default_id
            raw_url = obj.get("url")
            source = _own_source(f, obj.get(f.source_field))
            yield index, doc_id, text, nbytes, reason, raw_url if isinstance(raw_url, str) else "", source
            index += 1


def _read_parquet(f: InputFile, max_bytes: int) -> Iterator[Row]:
    fs, inner = filesystem_of(f.path)
    with fs.open_input_file(inner) as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        wanted = (f.text_field, "id", "url", f.source_field) if f.source_field else (f.text_field, "id", "url")
        columns = [c for c in dict.fromkeys(wanted) if c in names]
        index = 0
        name = _file_name(f.path)
        for rb in pf.iter_batches(batch_size=READ_BATCH, columns=columns or None):
            cols = rb.to_pydict()
            n = rb.num_rows
            texts = cols.get(f.text_field, [None] * n)
            ids = cols.get("id", [None] * n)
            urls = cols.get("url", [None] * n)
            sources = cols.get(f.source_field, [None] * n) if f.source_field else [None] * n
            for t, i, u, s in zip(texts, ids, urls, sources, strict=True):
                text, nbytes, reason = _check_text(t, max_bytes)
                doc_id = str(i) if i is not None else f"{f.source}/{name}:{index}"
                yield index, doc_id, text, nbytes, reason, u if isinstance(u, str) else "", _own_source(f, s)
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


def _read_html(f: InputFile, max_bytes: int) -> Iterator[Row]:
    with _open(f.path) as fh:
        raw = fh.read()
    doc_id = f"{f.source}/{_file_name(f.path)}"
    try:
        html = raw.decode("utf-8")
    except UnicodeDecodeError:
        yield 0, doc_id, "", len(raw), "read.invalid_utf8", "", ""
        return
    if len(raw) > max_bytes:
        yield 0, doc_id, html, len(raw), "read.too_large", "", ""
        return
    text, nbytes, reason = _check_text(html_to_text(html), max_bytes)
    yield 0, doc_id, text, nbytes, reason, "", ""


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
        for index, doc_id, text, nbytes, reason, url, source in READERS[f.format](f, max_doc_bytes):
            _record(batch, f, index, doc_id, text, nbytes, reason, url, source)
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
        source_field = str(batch["source_field"][i]) if "source_field" in batch else InputFile.source_field
        f = InputFile(str(batch["path"][i]), str(batch["source"][i]), int(batch["file_index"][i]),
                      str(batch["format"][i]), str(batch["text_field"][i]), bool(batch["missing"][i]),
                      source_field)
        yield from read_file(f, max_doc_bytes)

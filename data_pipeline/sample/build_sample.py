"""Rebuild the bundled sample corpus from Debian packages (see PROVENANCE.md next to this file).

    apt-get update && python data_pipeline/sample/build_sample.py   # needs apt-get and dpkg-deb

Downloads the .deb files with ``apt-get download`` into a temp dir, extracts them with ``dpkg-deb -x``,
and writes four JSONL.gz sources (``id``, ``text``, ``source``) next to this file. Grouping is
deterministic, so the same package versions give byte-identical text (gzip mtime is fixed to 0).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ["fortunes-zh", "fortunes", "fortunes-min", "debian-reference-en", "debian-reference-zh-cn"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EN_FORTUNE_FILES = ["computers", "science", "wisdom", "literature", "people", "education", "linux", "work",
                    "platitudes", "miscellaneous"]


def fetch(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=workdir, check=True)
    root = workdir / "root"
    for deb in sorted(workdir.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def fortunes(path: Path) -> list[str]:
    text = ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    return [f.strip("\n") for f in text.split("\n%\n") if f.strip()]


def group(pieces: Iterable[str], min_chars: int, sep: str = "\n\n") -> Iterator[str]:
    """Consecutive pieces joined until a document has at least ``min_chars`` characters."""
    buf: list[str] = []
    size = 0
    for p in pieces:
        buf.append(p)
        size += len(p)
        if size >= min_chars:
            yield sep.join(buf)
            buf, size = [], 0
    if buf:
        yield sep.join(buf)


def poem(text: str) -> str:
    """fortunes-zh poems: title and author lines on one line, then the verses."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = [ln for ln in lines if ln.startswith("《") or ln.startswith("作者")]
    body = [ln for ln in lines if ln not in head]
    return "\n".join([" ".join(head)] + body) if head else "\n".join(body)


def paragraphs(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    paras = [p.strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p) > 1]


def write(name: str, docs: Iterable[str]) -> int:
    n = 0
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for i, d in enumerate(docs):
            gz.write((json.dumps({"id": f"{name}-{i:05d}", "text": d, "source": name}, ensure_ascii=False)
                      + "\n").encode("utf-8"))
            n += 1
    (HERE / f"{name}.jsonl.gz").write_bytes(raw.getvalue())
    return n


def build(root: Path, max_zh_sayings: int) -> dict[str, int]:
    games = root / "usr/share/games/fortunes"
    ref = root / "usr/share/debian-reference"
    poems = [poem(p) for f in ("tang300", "song100") for p in fortunes(games / f)]
    sayings = fortunes(games / "chinese")[:max_zh_sayings]
    en = [f for name in EN_FORTUNE_FILES if (games / name).is_file() for f in fortunes(games / name)]
    return {
        "zh_poetry": write("zh_poetry", group(poems + sayings, 400)),
        "zh_manual": write("zh_manual", group(paragraphs(ref / "debian-reference.zh-cn.txt.gz"), 1200)),
        "en_manual": write("en_manual", group(paragraphs(ref / "debian-reference.en.txt.gz"), 2000)),
        "en_fortunes": write("en_fortunes", group(en, 600)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extracted", help="a directory where the packages are already extracted (dpkg-deb -x)")
    ap.add_argument("--max-zh-sayings", type=int, default=1500)
    args = ap.parse_args()
    if args.extracted:
        counts = build(Path(args.extracted), args.max_zh_sayings)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            counts = build(fetch(Path(tmp)), args.max_zh_sayings)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()

"""Rebuild ``sample_cloze.jsonl``: a small bilingual cloze task made from the bundled sample corpus.

Chinese items: the first half of a couplet from a Tang/Song poem (fortunes-zh); choose its true second
half among four of the same length. English items: the opening words of a sentence from the fortunes package;
choose its true ending among four
endings with the same number of words. Seeded, so rebuilding gives the same file.
The items come from the corpus the quickstart trains on, so accuracy measures how well the model fits
that corpus (chance is 25%), not generalization.

    python aquila_ray/eval/tasks/build_sample_tasks.py
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parents[2] / "data_pipeline" / "sample"


def _docs(name: str) -> list[str]:
    with gzip.open(SAMPLE / name, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def zh_pairs() -> list[tuple[str, str]]:
    pairs = []
    for doc in _docs("zh_poetry.jsonl.gz"):
        for line in doc.splitlines():
            m = re.fullmatch(r"([\u4e00-\u9fff]{5,7}，)([\u4e00-\u9fff]{5,7}[。？！])", line.strip())
            if m and len(m.group(1)) == len(m.group(2)):
                pairs.append((m.group(1), m.group(2)))
    return pairs


def en_pairs() -> list[tuple[str, str]]:
    pairs = []
    for doc in _docs("en_fortunes.jsonl.gz"):
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            words = sent.split()
            if 8 <= len(words) <= 16 and sent[0].isupper() and sent[-1] in ".!?" and sent.isascii():
                cut = len(words) // 2
                pairs.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
    return pairs


def build(pairs: list[tuple[str, str]], n: int, rng: random.Random, size: Callable[[str], int]) -> list[dict]:
    """n items; distractors have the same size as the answer (characters or words), so length is no cue."""
    chosen = rng.sample(pairs, n)
    endings = sorted({e for _, e in pairs})
    items = []
    for question, answer in chosen:
        distractors = rng.sample([e for e in endings if e != answer and size(e) == size(answer)], 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    return items


def main() -> None:
    rng = random.Random(2408_06567)
    items = build(zh_pairs(), 50, rng, len) + build(en_pairs(), 50, rng, lambda e: len(e.split()))
    out = HERE / "sample_cloze.jsonl"
    out.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {out}")


if __name__ == "__main__":
    main()

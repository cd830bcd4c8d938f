"""Peer tools configured like our pipeline, shared by the data benchmarks (bench/data_pipeline.py,
bench/data_scaling.py).

- datatrove (``pip install datatrove orjson``; JsonlReader needs orjson): language id on the same fastText
  lid.176 file as ours, Gopher quality + repetition (English only, our thresholds, whitespace words), C4
  bad words on our term lists, exact dedup (3 stages), MinHash (character 5-grams, 20 x 10, 4 stages),
  tokenize with the same tokenizer.json.
- NeMo Curator 1.4 (``pip install "nemo-curator[text-cpu]==1.4.*"``, Ray based): its CPU heuristic filters
  on the same rules, run in a child process (``python bench/_peers.py nemo ...``) with whatever Python has
  it installed, so it can live in its own virtual environment. Its exact and fuzzy dedup import cuDF
  (GPU only) and are left out.

This module imports only the standard library at the top: the NeMo child process runs it without our
packages, and datatrove is imported where it is used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ datatrove
def datatrove_blocks() -> dict[str, Any]:
    """datatrove pieces configured to match ours (imported lazily: datatrove is a bench-only install)."""
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.filters.c4_filters import C4BadWordsFilter
    from datatrove.utils.lid import FT176LID
    from datatrove.utils.word_tokenizers import WordTokenizer

    from data_pipeline.config import ToxicConfig
    from data_pipeline.steps import _lid_model_path, load_terms

    class WhitespaceWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return text.splitlines()

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            raise NotImplementedError

    class Characters(WhitespaceWords):
        def word_tokenize(self, text: str) -> list[str]:
            return [c for c in text if not c.isspace()]

    class LocalFT176(FT176LID):
        @property
        def model(self) -> Any:
            if getattr(self, "_model", None) is None:
                from fasttext.FastText import _FastText

                self._model = _FastText(str(_lid_model_path()))
            return self._model

        def predict(self, doc: Any) -> Any:  # FastTextLID.predict; fasttext-predict returns floats, not numpy
            langs, scores = self.model.predict(doc.text.replace("\n", " "), k=self.k)
            pairs = {lang.split("__")[2]: float(score) for lang, score in zip(langs, scores, strict=True)}
            best = max(pairs.items(), key=lambda x: x[1])
            return best, {lang: pairs.get(lang, 0.0) for lang in self.languages}

    class EnglishOnlyQuality(GopherQualityFilter):
        def filter(self, doc: Any) -> Any:
            return True if doc.metadata.get("language") != "en" else super().filter(doc)

    class EnglishOnlyRepetition(GopherRepetitionFilter):
        def filter(self, doc: Any) -> Any:
            return True if doc.metadata.get("language") != "en" else super().filter(doc)

    class LanguageFilterLocal(BaseFilter):
        """datatrove's LanguageFilter.filter, verbatim in effect, on its FT176LID with a local model file.
        (datatrove's own class insists on the fasttext-numpy2-wheel distribution, which would replace the
        fasttext-predict module our pipeline uses; both expose the same `fasttext` predict API.)"""

        name = "🌍 Language ID (local ft176)"

        def __init__(self, languages: list[str], threshold: float) -> None:
            super().__init__()
            self.languages, self.threshold = languages, threshold
            self.model = LocalFT176(languages)

        def filter(self, doc: Any) -> bool:
            (lang, score), _ = self.model.predict(doc)
            doc.metadata["language"], doc.metadata["language_score"] = lang, score
            return lang in self.languages and score > self.threshold

    class LocalBadWords(C4BadWordsFilter):
        """C4BadWordsFilter on our term lists (datatrove downloads LDNOOBW's; this machine has no network).
        Same regex datatrove builds: substrings for zh, whole words elsewhere."""

        def _get_badwords(self, lang: str) -> Any:
            import re

            files = ToxicConfig().term_files
            if lang not in self._badwords_regex:
                if lang not in files:
                    return None
                words = [re.escape(w) for w in load_terms(files[lang])]
                self._badwords_regex[lang] = (re.compile("|".join(words)) if lang in ("ja", "th", "zh") else
                                              re.compile(r"(?:\W|^)({})(?:\W|$)".format("|".join(words))))
            return self._badwords_regex[lang]

    def language_filter() -> Any:
        return LanguageFilterLocal(["en", "zh"], 0.3)

    return {"language_filter": language_filter, "words": WhitespaceWords, "chars": Characters,
            "quality": lambda: EnglishOnlyQuality(language=WhitespaceWords()),
            "repetition": lambda: EnglishOnlyRepetition(language=WhitespaceWords(), dup_para_frac=None,
                                                        dup_line_char_frac=None, dup_para_char_frac=None,
                                                        dup_n_grams=()),
            "badwords": lambda: LocalBadWords(fail_on_missing_language=False)}


def _xxh64_str(data: str) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(data.encode("utf-8"))


def _exact_key(doc: Any) -> bytes:
    """What our exact dedup hashes: the text lower-cased with whitespace runs collapsed."""
    return " ".join(doc.text.lower().split()).encode("utf-8")


def _executor(work: Path, name: str, pipeline: list[Any], tasks: int, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor

    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(work / "logs" / name),
                          skip_completed=False).run()


def run_datatrove_minhash(input_dir: Path, work: Path, tasks: int, workers: int, blocks: dict[str, Any],
                          tokenizer: str | None) -> None:
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(n_grams=5, num_buckets=20, hashes_per_bucket=10)
    sig = MinhashDedupSignature(str(work / "sigs"), config=cfg, language=blocks["chars"]())
    # datatrove 0.10.1 hands str to xxhash, which xxhash 4 refuses; same hash of the encoded string
    sig._hash_func = _xxh64_str
    _executor(work, "sig", [JsonlReader(str(input_dir), glob_pattern="*.jsonl"), sig], tasks, workers)
    _executor(work, "buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)],
              cfg.num_buckets, workers)
    _executor(work, "cluster", [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)], 1, 1)
    final: list[Any] = [JsonlReader(str(input_dir), glob_pattern="*.jsonl"), MinhashDedupFilter(str(work / "remove"))]
    if tokenizer:
        final.append(DocumentTokenizer(str(work / "tokens"), tokenizer_name_or_path=tokenizer,
                                       eos_token="<|endoftext|>", shuffle_documents=False))
    else:
        final.append(JsonlWriter(str(work / "kept"), compression=None))
    _executor(work, "filter", final, tasks, workers)


def run_datatrove_chain(input_dir: Path, work: Path, tokenizer: str, blocks: dict[str, Any]) -> None:
    """bench/data_pipeline.py's chain: filters (lang, Gopher) -> MinHash (4 stages) -> tokenize."""
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    _executor(work, "filters", [JsonlReader(str(input_dir), glob_pattern="*.jsonl"), blocks["language_filter"](),
                                blocks["quality"](), blocks["repetition"](),
                                JsonlWriter(str(work / "filtered"), compression=None)], 4, 2)
    run_datatrove_minhash(work / "filtered", work, 4, 2, blocks, tokenizer)


def run_datatrove_full_chain(input_dir: Path, work: Path, tokenizer: str, blocks: dict[str, Any], tasks: int,
                             workers: int) -> dict[str, float]:
    """Our chain in datatrove: filters (lang, Gopher quality + repetition, C4 bad words) -> exact dedup
    (signature, find, filter) -> MinHash (signature, buckets, cluster, filter) -> tokenize. Seconds per part."""
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    _executor(work, "filters", [JsonlReader(str(input_dir), glob_pattern="*.jsonl"), blocks["language_filter"](),
                                blocks["quality"](), blocks["repetition"](), blocks["badwords"](),
                                JsonlWriter(str(work / "filtered"), compression=None)], tasks, workers)
    seconds["filters"] = time.perf_counter() - t
    t = time.perf_counter()
    ecfg = ExactDedupConfig(content_getter=_exact_key)
    _executor(work, "exact_sig", [JsonlReader(str(work / "filtered"), glob_pattern="*.jsonl"),
                                  ExactDedupSignature(str(work / "exact_sigs"), config=ecfg)], tasks, workers)
    _executor(work, "exact_find", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=ecfg)],
              1, 1)
    _executor(work, "exact_filter", [JsonlReader(str(work / "filtered"), glob_pattern="*.jsonl"),
                                     ExactDedupFilter(str(work / "exact_dups"), config=ecfg),
                                     JsonlWriter(str(work / "exact"), compression=None)], tasks, workers)
    seconds["exact_dedup"] = time.perf_counter() - t
    t = time.perf_counter()
    run_datatrove_minhash(work / "exact", work, tasks, workers, blocks, tokenizer)
    seconds["minhash_and_tokenize"] = time.perf_counter() - t
    return seconds


def count_jsonl(folder: Path) -> int:
    return sum(1 for f in folder.glob("*.jsonl") for _ in f.open("rb"))


# ------------------------------------------------------------------------------------------------ NeMo Curator
def _lang_of(score: str) -> str:
    """FastTextLangId's score is the string "[probability, 'label']"."""
    return str(eval(score)[1]).casefold()  # noqa: S307 (NeMo's own keep_document evals it the same way)


def _is_kept_language(lang: str) -> bool:
    return lang in ("en", "zh")


def nemo_heuristic_chain(input_dir: str, output_dir: str, lid_model: str) -> list[Any]:
    """NeMo Curator stages for our filter chain: JsonlReader -> FastTextLangId (lid.176, score >= 0.3)
    -> keep en/zh -> English-only Gopher/C4 heuristics with our thresholds -> repeated lines (both
    languages) -> JsonlWriter. NeMo's filters see only text, so the English-only ones run in a ScoreFilter
    that applies them to rows whose language is en (as datatrove's are wrapped above)."""
    from dataclasses import dataclass

    import pandas as pd
    from nemo_curator.stages.text.filters import Filter, Score, ScoreFilter
    from nemo_curator.stages.text.filters.fasttext.fasttext_filters import FastTextLangId
    from nemo_curator.stages.text.filters.heuristic.repetition.repetition import (
        RepeatedLinesFilter,
        RepeatingTopNGramsFilter,
    )
    from nemo_curator.stages.text.filters.heuristic.string import (
        BulletsFilter,
        CommonEnglishWordsFilter,
        EllipsisFilter,
        MeanWordLengthFilter,
        SymbolsToWordsFilter,
        WordCountFilter,
        WordsWithoutAlphabetsFilter,
    )
    from nemo_curator.stages.text.io.reader import JsonlReader
    from nemo_curator.stages.text.io.writer import JsonlWriter

    @dataclass
    class EnglishOnlyScoreFilter(ScoreFilter):
        def compute_filter_mask(self, df: pd.DataFrame, filter_obj: Any, text_field: str, score_field: str | None,
                                invert: bool) -> pd.Series:
            mask = pd.Series(True, index=df.index)
            en = df["lang"] == "en"
            if en.any():
                mask[en] = df.loc[en, text_field].apply(filter_obj.score_document).apply(filter_obj.keep_document)
            return mask

    english = [WordCountFilter(min_words=50, max_words=100_000), MeanWordLengthFilter(3, 10),
               SymbolsToWordsFilter(max_symbol_to_word_ratio=0.1), BulletsFilter(max_bullet_lines_ratio=0.9),
               EllipsisFilter(max_num_lines_ending_with_ellipsis_ratio=0.3),
               WordsWithoutAlphabetsFilter(min_words_with_alphabets=0.8), CommonEnglishWordsFilter(2),
               RepeatingTopNGramsFilter(n=2, max_repeating_ngram_ratio=0.20),
               RepeatingTopNGramsFilter(n=3, max_repeating_ngram_ratio=0.18),
               RepeatingTopNGramsFilter(n=4, max_repeating_ngram_ratio=0.16)]
    return [
        JsonlReader(input_dir, fields=["id", "text"]),
        ScoreFilter(FastTextLangId(model_path=lid_model, min_langid_score=0.3), score_field="language"),
        Score(score_fn=_lang_of, score_field="lang", text_field="language"),
        Filter(filter_fn=_is_kept_language, filter_field="lang"),
        EnglishOnlyScoreFilter(english, name="english_heuristics"),
        ScoreFilter(RepeatedLinesFilter(max_repeated_line_fraction=0.7), name="repeated_lines"),
        JsonlWriter(output_dir, fields=["id", "text", "lang"]),
    ]


def nemo_main(argv: list[str]) -> None:
    """Child process: run the NeMo chain once on a fresh local Ray; print one JSON line of results."""
    ap = argparse.ArgumentParser(prog="_peers.py nemo")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--lid", required=True, help="fastText lid.176 model file")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--executor", choices=["ray_data", "xenna"], default="ray_data")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import importlib.metadata as md

    import ray
    from loguru import logger
    from nemo_curator.pipeline import Pipeline

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - t
    if args.executor == "xenna":
        from nemo_curator.backends.xenna import XennaExecutor

        executor: Any = XennaExecutor()
    else:
        from nemo_curator.backends.ray_data import RayDataExecutor

        executor = RayDataExecutor()
    pipe = Pipeline(name="heuristics", stages=nemo_heuristic_chain(args.input, args.output, args.lid))
    t = time.perf_counter()
    pipe.run(executor)
    seconds = time.perf_counter() - t
    if ray.is_initialized():
        ray.shutdown()
    print(json.dumps({"seconds": seconds, "ray_init_seconds": ray_init, "kept": count_jsonl(Path(args.output)),
                      "executor": args.executor, "versions": {p: md.version(p) for p in
                                                              ("nemo-curator", "ray", "pandas", "fasttext")}}))


def run_nemo(python: str, input_dir: Path, output_dir: Path, lid_model: str, cpus: int, executor: str,
             timeout_s: float) -> dict[str, Any]:
    """Run ``nemo_main`` under ``python`` (a venv with nemo-curator); the result, or {"error": why}."""
    cmd = [python, str(Path(__file__).resolve()), "nemo", "--input", str(input_dir), "--output", str(output_dir),
           "--lid", lid_model, "--cpus", str(cpus), "--executor", executor]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAY_AUTH_MODE"] = "disabled"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=str(REPO))
    except FileNotFoundError:
        return {"error": f"{python} not found; install NeMo Curator as the docstring says and pass --nemo-python"}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "command": " ".join(cmd)}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}: {p.stderr.strip()[-1500:]}", "command": " ".join(cmd)}
    return {**json.loads(lines[-1]), "command": " ".join(cmd)}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "nemo":
        nemo_main(sys.argv[2:])
    else:
        sys.exit("usage: python bench/_peers.py nemo --input DIR --output DIR --lid MODEL [--cpus N]")

"""Preprocessing-only job: raw zh/en documents -> clean/, rejected/, stats.json, tokenizer.json, token shards.

    python -m jobs.prepare_data --output runs/data/sample                      # the bundled sample corpus
    python -m jobs.prepare_data --input 'web=data/web/*.jsonl.gz' --input wiki.parquet --output DIR \
        --config data.yaml --set pack.seq_len=2048 --set tokenizer.vocab_size=32000
    ray job submit --working-dir . -- python -m jobs.prepare_data --input ... --output /mnt/data/run1

Thin by design (STYLE.md rule 10): parse, build the DataConfig, call ``data_pipeline.run.prepare_data``.
"""

from __future__ import annotations

import argparse
import json
import sys

from aquila_ray.config.base import to_dict
from data_pipeline.config import load_data_config
from data_pipeline.output import Output
from data_pipeline.run import describe_plan, prepare_data
from jobs.common import base_parser, print_plan, run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = base_parser(__doc__ or "")
    ap.prog = "python -m jobs.prepare_data"
    ap.add_argument("--input", action="append", default=[], metavar="[NAME=]GLOB",
                    help="input files (JSONL[.gz], Parquet, HTML); repeatable; default: the bundled sample corpus")
    ap.add_argument("--output", help="output directory (default: runs/data/sample)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Raises AquilaError on bad config or data (run_main turns it into one line and exit code 2)."""
    args = parse_args(argv)
    config = load_data_config(args.config, args.overrides, args.input or None, args.output)
    if args.dry_run:
        print_plan("prepare_data", {"config": to_dict(config), "plan": describe_plan(config)})
        return 0
    out = prepare_data(config)
    stats = json.loads(Output(out).read_text("stats.json"))  # a local directory or a URI (s3://...)
    print(json.dumps({"output": str(out), "total": stats["total"], "tokens": stats.get("tokenize", {})},
                     indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))

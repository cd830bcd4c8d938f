"""Train the bilingual byte-level BPE alone, on raw inputs (no filtering), and write tokenizer.json.

    python -m jobs.train_tokenizer --output runs/tokenizer.json --set tokenizer.vocab_size=32000
    python -m jobs.train_tokenizer --input 'zh=/data/zh/*.jsonl.gz' --input /data/en.parquet --output tok.json

``python -m jobs.prepare_data`` trains the same tokenizer on the *cleaned* corpus as one of its steps; use
this job to build a tokenizer first and pass it with ``--set tokenizer.path=tok.json``.
"""

from __future__ import annotations

import json
import sys

from aquila_ray.config.base import to_dict
from data_pipeline.config import load_data_config
from data_pipeline.readers import plan_inputs
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer_from_inputs
from jobs.common import base_parser, print_plan, run_main


def main(argv: list[str] | None = None) -> int:
    ap = base_parser(__doc__ or "")
    ap.prog = "python -m jobs.train_tokenizer"
    ap.add_argument("--input", action="append", default=[], metavar="[NAME=]GLOB",
                    help="input files (JSONL[.gz], Parquet, HTML); repeatable; default: the bundled sample corpus")
    ap.add_argument("--output", required=True, help="where to write tokenizer.json")
    args = ap.parse_args(argv)
    config = load_data_config(args.config, args.overrides, args.input or None)
    if args.dry_run:
        print_plan("train_tokenizer", {"tokenizer": to_dict(config.tokenizer), "output": args.output,
                                       "inputs": [f.path for f in plan_inputs(config)]})
        return 0
    out = train_tokenizer_from_inputs(config, args.output)
    print(json.dumps({"output": str(out), "vocab_size": load_tokenizer(out).get_vocab_size()}))
    return 0


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))

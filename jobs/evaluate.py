"""Evaluate a checkpoint: validation loss / perplexity on token shards and perplexity-based multiple choice.

    python -m jobs.evaluate --ckpt CKPT --data DATA_DIR [--tasks TASKS.jsonl] [--output results.json]

``--data`` is a prepared data directory (manifest.json, tokens/, tokenizer.json). ``--tasks`` defaults to
the bundled sample task file; the tokenizer defaults to DATA_DIR/tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from aquila_ray.eval import SAMPLE_TASKS, evaluate_checkpoint
from jobs.common import base_parser, print_plan, run_main


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__ or "", takes_config=False)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (dense or MoE)")
    parser.add_argument("--data", default=None, help="prepared data directory (for loss and the tokenizer)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-sequences", type=int, default=None)
    parser.add_argument("--tasks", default=str(SAMPLE_TASKS), help="multiple-choice JSONL ('' to skip)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: DATA/tokenizer.json)")
    parser.add_argument("--output", default=None, help="write the results JSON here too")
    args = parser.parse_args(argv)
    if args.dry_run:
        print_plan("evaluate", vars(args))
        return
    results = evaluate_checkpoint(args.ckpt, data_dir=args.data, split=args.split, tasks=args.tasks or None,
                                  tokenizer=args.tokenizer, max_sequences=args.max_sequences)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    run_main(main)

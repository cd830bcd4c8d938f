"""Evaluate a checkpoint with lm-evaluation-harness (the ``lm-eval`` extra): the AquilaMoE card's tables.

    python -m jobs.lm_eval CHECKPOINT --tasks arc_easy,hellaswag [--include-path DIR] [--num-fewshot N]
        [--limit N] [--batch-size N] [--device cpu|cuda] [--tokenizer PATH] [--output FILE]

The checkpoint is wrapped as lm-eval's ``aquila-ray`` model (``aquila_ray.eval.harness.AquilaLM``); the
tokenizer defaults to CHECKPOINT/tokenizer.json (the trainer stores it there). lm-eval's own tasks download
their datasets from the Hugging Face hub; ``--include-path`` adds a folder of task YAMLs (local data works
offline). Prints lm-eval's results JSON (the summary table goes to stderr); ``--output`` writes it too.
Needs ``pip install 'aquila-ray[lm-eval]'``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aquila_ray.errors import AquilaError, CheckpointError
from jobs.common import base_parser, print_plan, run_main


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__ or "", takes_config=False)
    parser.add_argument("checkpoint", help="checkpoint directory (dense or MoE)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", default=None, help="a folder of extra lm-eval task YAMLs")
    parser.add_argument("--only-include-path", action="store_true",
                        help="read tasks from --include-path only, not lm-eval's built-in ones (faster start)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=float, default=None, help="items per task (< 1: a fraction; for tests)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: CHECKPOINT/tokenizer.json)")
    parser.add_argument("--log-samples", action="store_true", help="keep every item's requests and scores")
    parser.add_argument("--output", default=None, help="write the results JSON here too")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.dry_run:
        print_plan("lm_eval", {**vars(args), "tasks": tasks})
        return
    if not Path(args.checkpoint).is_dir():
        raise CheckpointError(f"checkpoint directory {args.checkpoint} does not exist")
    if args.only_include_path and args.include_path is None:
        raise AquilaError("--only-include-path needs --include-path DIR")
    try:  # deferred: lm-evaluation-harness is the optional `lm-eval` extra; a clear error when it is missing
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise AquilaError(f"lm-evaluation-harness is not installed ({e}): pip install 'aquila-ray[lm-eval]'") from e
    from lm_eval.utils import handle_non_serializable, make_table  # deferred: the optional extra (above)

    from aquila_ray.eval.harness import evaluate_harness  # deferred: it imports lm_eval

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_harness(args.checkpoint, tasks, include_path=args.include_path,
                               include_defaults=not args.only_include_path, num_fewshot=args.num_fewshot,
                               limit=limit, batch_size=args.batch_size, device=args.device,
                               tokenizer=args.tokenizer, log_samples=args.log_samples, dtype=args.dtype)
    print(make_table(results), file=sys.stderr)
    text = json.dumps({"checkpoint": str(args.checkpoint), **results}, indent=2, default=handle_non_serializable,
                      ensure_ascii=False)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    run_main(main)

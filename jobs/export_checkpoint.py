"""Write the model checkpoint (config.json + safetensors + index) of a sharded training checkpoint.

    python -m jobs.export_checkpoint RUN_DIR/checkpoint_... --output DIR [--max-shard-bytes N]

A run's last checkpoint already holds the model export; this writes one from any other (an intermediate
step, a run that died). Each tensor is assembled from every rank's saved slice and written before the next
is read, so memory stays at one tensor plus one output shard. ``--dry-run`` prints what would be written.
"""

from __future__ import annotations

import json

from aquila_ray.train.checkpointing import export_model, model_config_of, read_trainer_state, saved_chunks
from jobs.common import base_parser, print_plan, run_main


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__ or "", takes_config=False)
    parser.add_argument("checkpoint", help="a training checkpoint directory (holds state/ and trainer_state.json)")
    parser.add_argument("--output", required=True, help="the model checkpoint directory to write")
    parser.add_argument("--max-shard-bytes", type=int, default=2 * 1024**3, help="split safetensors files above this")
    args = parser.parse_args(argv)
    state = read_trainer_state(args.checkpoint)
    if args.dry_run:
        chunks = saved_chunks(args.checkpoint)
        weights = {k: parts for k, parts in chunks.items() if k.startswith("weight/")}
        print_plan("export", {"step": state["step"], "model": model_config_of(state).describe(),
                              "tensors": len(weights), "fp32_bytes": 4 * sum(max(o + n for o, n, _ in p)
                                                                            for p in weights.values()),
                              "saved_by_ranks": len({path.name for p in chunks.values() for _, _, path in p}),
                              "output": args.output})
        return
    out = export_model(args.checkpoint, args.output, max_shard_bytes=args.max_shard_bytes)
    print(json.dumps({"checkpoint": str(out), "step": state["step"]}))


if __name__ == "__main__":
    run_main(main)

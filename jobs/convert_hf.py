"""Convert between aquila-ray checkpoints and Hugging Face models.

    python -m jobs.convert_hf from-hf HF_DIR CKPT     # Qwen2 / Llama (and MoE: Qwen2-MoE / Mixtral) -> ours
    python -m jobs.convert_hf to-hf CKPT HF_DIR       # ours -> transformers' AutoModelForCausalLM + AutoTokenizer
"""

from __future__ import annotations

import json
from pathlib import Path

from aquila_ray.checkpoint import CheckpointReader
from aquila_ray.config import to_dict
from aquila_ray.hf import config_from_hf, export_hf, import_hf, pick_architecture
from jobs.common import base_parser, print_plan, run_main


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__ or "", takes_config=False)
    sub = parser.add_subparsers(dest="direction", required=True)
    src = sub.add_parser("from-hf", help="import a Hugging Face model directory")
    src.add_argument("hf_dir")
    src.add_argument("ckpt")
    dst = sub.add_parser("to-hf", help="export a checkpoint to Hugging Face format")
    dst.add_argument("ckpt")
    dst.add_argument("hf_dir")
    dst.add_argument("--arch", default=None, help="HF architecture (default: the first that fits)")
    dst.add_argument("--tokenizer", default=None, help="a tokenizers tokenizer.json to write with the model "
                     "(default: the one the checkpoint was trained with, which the trainer stores in it)")
    for p in (src, dst):
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="cast weights (default: keep)")
        p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest output shard")
    args = parser.parse_args(argv)
    shard = int(args.max_shard_gb * 1024**3)
    if args.direction == "from-hf":
        cfg, arch = config_from_hf(json.loads((Path(args.hf_dir) / "config.json").read_text()))
        if args.dry_run:
            print_plan("from-hf", {"architecture": arch.architecture, "model": to_dict(cfg),
                                   "parameters": cfg.num_params(), "output": args.ckpt})
            return
        out = import_hf(args.hf_dir, args.ckpt, dtype=args.dtype, max_shard_bytes=shard)
    else:
        reader = CheckpointReader(args.ckpt, verify=False)
        arch = pick_architecture(reader.config, args.arch)
        if args.dry_run:
            print_plan("to-hf", {"architecture": arch.architecture, "model": reader.config.describe(),
                                 "output": args.hf_dir})
            return
        out = export_hf(args.ckpt, args.hf_dir, arch=args.arch, dtype=args.dtype, max_shard_bytes=shard,
                        tokenizer=args.tokenizer)
        if not (out / "tokenizer.json").is_file():
            print(f"note: {args.ckpt} carries no tokenizer; AutoTokenizer needs one: rerun with --tokenizer "
                  f"DATA_DIR/tokenizer.json")
    print(f"wrote {out} ({arch.architecture})")


if __name__ == "__main__":
    run_main(main)

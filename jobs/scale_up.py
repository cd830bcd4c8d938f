"""Scale-Up: grow a dense checkpoint with FPI, AKI or AKI-Pro, as a Ray task (or in-process with --local).

    python -m jobs.scale_up --src ckpt/small --dst ckpt/large --method aki-pro --target-preset aquila3-16b
    python -m jobs.scale_up --src ckpt/small --dst ckpt/large --method fpi --depth-mode identity \\
        --hidden-size 80 --num-heads 10 --intermediate-size 220 --num-layers 4
    python -m jobs.scale_up --src ckpt/small --dst ckpt/large --target-preset tiny-large --dry-run

Writes the grown checkpoint and growth_report.json inside it (method, options, shapes, parameter counts,
seed, measured max |logit diff| and loss before/after on a probe batch). Papers: bert2BERT (ACL 2022),
Apollo (arXiv 2401.09192), AquilaMoE (arXiv 2408.06567). A --config file holds the same fields as
ScaleUpConfig: ``growth: {...}``, ``target_preset``, ``target: {hidden_size: ...}``, ``num_cpus``, ...
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from aquila_ray.checkpoint import load_config
from aquila_ray.config import ModelConfig, apply_overrides, get_preset, resolve, to_dict
from aquila_ray.config.growth import ScaleUpConfig
from aquila_ray.growth import make_plan
from aquila_ray.growth.checkpoint import memory_estimate_bytes
from aquila_ray.pipeline.tasks import run_scale_up, use_transform_env
from jobs.common import base_parser, print_plan, run_main

DIMS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--src", required=True, help="source checkpoint directory")
    parser.add_argument("--dst", default=None, help="output checkpoint directory (required unless --dry-run)")
    parser.add_argument("--method", choices=["fpi", "aki", "aki-pro"], default=None, help="growth method")
    parser.add_argument("--depth-mode", choices=["interpolate", "stack", "identity"], default=None,
                        help="depth growth (default: the method's own: fpi/aki-pro interpolate, aki stack)")
    parser.add_argument("--norm-mode", choices=["exact", "paper"], default=None, help="RMSNorm handling")
    parser.add_argument("--map", choices=["circular", "random"], default=None, help="how new units pick a source")
    parser.add_argument("--seed", type=int, default=None, help="seed of random maps and the probe batch")
    parser.add_argument("--no-probe", action="store_true", help="skip the function-preservation probe")
    parser.add_argument("--target-preset", default=None, help="target shape preset (e.g. tiny-large, aquila3-16b)")
    for dim in DIMS:
        parser.add_argument(f"--{dim.replace('_', '-')}", type=int, default=None, help=f"target {dim}")
    parser.add_argument("--max-shard-gb", type=float, default=None, help="largest output shard (GiB)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs for the Ray task")
    parser.add_argument("--memory-gb", type=float, default=None, help="memory for the Ray task (default: estimate)")
    parser.add_argument("--local", action="store_true", help="run in this process, without Ray")
    return parser


def flags(args: argparse.Namespace) -> dict[str, Any]:
    """The fields this job's own options set (``resolve``: defaults < --config file < these < --set)."""
    growth = {field: getattr(args, flag) for flag, field in (
        ("method", "method"), ("depth_mode", "depth_mode"), ("norm_mode", "norm_mode"), ("map", "map"),
        ("seed", "seed")) if getattr(args, flag) is not None}
    if args.no_probe:
        growth["probe"] = False
    target = {d: getattr(args, d) for d in DIMS if getattr(args, d) is not None}
    out: dict[str, Any] = {"growth": growth, "target": target}
    for flag, field, scale in (("target_preset", "target_preset", None), ("max_shard_gb", "max_shard_bytes", 1024**3),
                               ("num_cpus", "num_cpus", None), ("memory_gb", "memory_bytes", 1024**3)):
        value = getattr(args, flag)
        if value is not None:
            out[field] = value if scale is None else int(value * scale)
    if args.local:
        out["local"] = True
    return out


def target_config(cfg: ScaleUpConfig, src: ModelConfig) -> ModelConfig:
    """The preset (vocab_size from the source: it comes from the tokenizer) or the source's config, with the
    named fields set; unnamed dims stay."""
    base = src if cfg.target_preset is None else apply_overrides(get_preset(cfg.target_preset),
                                                                 {"vocab_size": src.vocab_size})
    return apply_overrides(base, cfg.target) if cfg.target else base


def main(argv: list[str] | None = None) -> None:
    use_transform_env()  # before any tensor exists: the growth may run in this process (--local)
    args = build_parser().parse_args(argv)
    cfg = resolve(ScaleUpConfig, None, args.config, args.overrides, flags(args))
    src = load_config(args.src)
    target = target_config(cfg, src)
    plan = make_plan(src, target, cfg.growth)  # validates before any compute
    if args.dry_run:
        print_plan("scale_up config", to_dict(cfg))
        print_plan("scale_up plan", {**plan.summary(),
                                     "memory_estimate_bytes": memory_estimate_bytes(plan, 4, cfg.max_shard_bytes),
                                     "source_model": src.describe(), "target_model": plan.dst.describe()})
        return
    if args.dst is None:
        build_parser().error("--dst is required (or pass --dry-run)")
    report = run_scale_up(args.src, args.dst, cfg.growth, target, max_shard_bytes=cfg.max_shard_bytes,
                          local=cfg.local, num_cpus=cfg.num_cpus, memory=cfg.memory_bytes)
    summary = {k: report[k] for k in ("destination", "method", "depth_mode", "norm_mode", "parameters", "seconds")}
    summary["probe"] = report.get("probe")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_main(main)

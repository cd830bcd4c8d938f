"""Scale-Out: upcycle a dense checkpoint into a Mixture of Experts (offline), as a Ray task.

    python -m jobs.scale_out --src DENSE --dst MOE --num-experts 8 --top-k 2 [--granularity G]
                             [--router-init-std 0.02] [--seed S] [--set moe.router_order=softmax_then_topk]

Every MLP becomes E experts (exact copies; with G > 1, 1/G slices with virtual-group router init and
weight scaling, arXiv 2410.07524; ``--set moe.drop_upcycling_ratio=0.5`` re-initializes half of each expert's
units, Drop-Upcycling, arXiv 2502.19261). Writes the MoE checkpoint and DST/upcycle_report.json with the measured
logit difference against the dense model on a probe batch. ``--set``/``--config`` apply to the target
model config (fields of ModelConfig, e.g. ``moe.capacity_factor=1.25``). Runs in a Ray task (joining the
running cluster, or starting a local one); ``--local`` runs in this process. Online upcycling (no MoE
checkpoint at all) happens inside the MoE training job instead.
"""

from __future__ import annotations

import json
from typing import Any

from aquila_ray.checkpoint import load_config
from aquila_ray.config import ModelConfig, resolve, to_dict
from aquila_ray.pipeline.tasks import run_scale_out, use_transform_env
from aquila_ray.upcycle import UpcycleOptions, exactly_preserving, method, moe_config, weight_scale
from jobs.common import base_parser, print_plan, run_main


def plan(src: ModelConfig, dst: ModelConfig, options: UpcycleOptions) -> dict[str, Any]:
    assert dst.moe is not None
    m = dst.moe
    G = m.granularity
    return {
        "method": method(dst),
        "source": src.describe(),
        "target": dst.describe(),
        "parameters": {"dense": src.num_params(), "moe_total": dst.num_params(),
                       "moe_active": dst.num_params(active=True)},
        "expert_layout": {
            "experts_per_layer": m.num_experts, "top_k": m.top_k, "granularity": G,
            "expert_intermediate_size": dst.expert_intermediate_size,
            "expert_e_holds": f"dense MLP slice e % {G} (rows [(e%G)*F_e, (e%G+1)*F_e))" if G > 1
            else "a full copy of the dense MLP",
            "virtual_groups": m.num_experts // G,
        },
        "router": {"init": f"N(0, std={m.router_init_std})", "order": m.router_order,
                   "renormalize": m.renormalize, "seed": options.seed},
        "weight_scale": weight_scale(dst, options),
        "exactly_preserving_expected": exactly_preserving(dst, options),
    }


def main(argv: list[str] | None = None) -> None:
    use_transform_env()  # before any tensor exists: the upcycling may run in this process (--local)
    parser = base_parser(__doc__ or "")
    parser.add_argument("--src", required=True, help="dense checkpoint directory")
    parser.add_argument("--dst", required=True, help="MoE checkpoint directory to write")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--granularity", type=int, default=1, help="G > 1: virtual-group granular upcycling")
    parser.add_argument("--router-init-std", type=float, default=0.02, help="router init N(0, std)")
    parser.add_argument("--seed", type=int, default=0, help="router init seed")
    parser.add_argument("--no-weight-scaling", action="store_true", help="skip 2410.07524's expert weight scaling")
    parser.add_argument("--no-probe", action="store_true", help="skip the dense-vs-MoE logit probe")
    parser.add_argument("--local", action="store_true", help="run in this process instead of a Ray task")
    args = parser.parse_args(argv)

    src = load_config(args.src)
    dst = moe_config(src, args.num_experts, args.top_k, args.granularity, router_init_std=args.router_init_std)
    dst = resolve(ModelConfig, dst, args.config, args.overrides)  # --config/--set change the MoE model's fields
    options = UpcycleOptions(seed=args.seed, weight_scaling=not args.no_weight_scaling)
    if args.dry_run:
        print_plan("scale_out", {"config": to_dict(dst), "plan": plan(src, dst, options),
                                 "output": args.dst, "runner": "local" if args.local else "ray task"})
        return
    report = run_scale_out(args.src, args.dst, dst, options, probe=not args.no_probe, local=args.local)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_main(main)

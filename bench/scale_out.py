"""The Scale-Out study: does the upcycled MoE beat simply continuing the dense model, and under which option?

From one grown dense checkpoint (tiny trained, grown to tiny-large with AKI-Pro, trained: the recipe's path,
as in bench/efficientscale.py) it trains continued dense, and the upcycled 8-expert top-2 MoE once per recipe
option (``VARIANTS``), all with the same schedule, batch and data position, through the real trainer (Ray
Train, DeepSpeed, 1 CPU worker). Validation loss is measured every ``--eval-every`` steps against cumulative
training FLOPs. The dense run gets the FLOPs of the default MoE run (more steps: the MoE costs more per
token). For each MoE option the result is ``moe_flops_to_dense_loss_ratio``: the FLOPs at which its curve
first reaches the dense run's final validation loss, over the dense run's FLOPs (goal <= 0.8; None: not
reached within its budget). Writes ``bench/results/scale_out.json`` and ``.png``.

Two diagnostics say why an option misses the goal. A dense run of the MoE's step count and schedule gives
each option's gain per *step* (``val_loss_minus_dense_same_steps``, < 0: the MoE learned more per step);
an MoE costs ``flops_per_step_over_dense`` per step, so meeting the goal needs it to reach the dense loss
in 0.8 / that many steps, which it cannot where it learns no more per step than the dense model.
``--capacity-steps N`` also trains the dense and the default MoE *from scratch* for N steps: if even a
fresh MoE gains nothing per step at this model and data size, the extra expert parameters are not what
limits the loss here (too few tokens, too little training), and no upcycling option can pay.

    python bench/scale_out.py [--moe-steps 160] [--variants default,granular_g2,...] [--capacity-steps 900]
                              [--work DIR]

With ``--work DIR`` every finished run is kept (DIR/base.json, DIR/moe-NAME.json, DIR/dense-STEPS.json): a
rerun, e.g. with more variants, trains only the new ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientscale import RESULTS, Bench, flops_to_reach  # bench/efficientscale.py: the same runs and curves

from aquila_ray.checkpoint import load_config
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.pipeline.tasks import run_scale_out, run_scale_up
from aquila_ray.upcycle import moe_config

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # topk_then_softmax, batch aux loss 0.001, z-loss 0.01, dropless (the recipe today)
    # (softmax_then_topk *with* renormalization is the same function as the default, so it is not a variant)
    "softmax_then_topk_unnormalized": {"router_order": "softmax_then_topk", "renormalize": False},
    "sequence_aux_loss": {"aux_loss_scope": "sequence"},
    "aux_loss_free_bias": {"bias_update_rate": 0.01, "aux_loss_coeff": 0.0},
    "router_lr_x10": {"router_lr_mult": 10.0},
    "granular_g2": {"granularity": 2},  # 8 experts of width F/2, top-2: the dense model's active FLOPs
    "expert_lr_half": {"expert_lr_mult": 0.5},  # the copied experts move slower than the new router
    # Drop-Upcycling (arXiv 2502.19261) at the paper's r = 0.5: half of each expert's units re-drawn, so the
    # experts differ from the start (not function preserving)
    "drop_upcycling": {"drop_upcycling_ratio": 0.5},
}
GOAL = 0.8


def cached(path: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result, kept in ``path``: a rerun with the same ``--work`` (e.g. with more ``--variants``)
    trains only what it has not trained yet."""
    if path.is_file():
        return dict(json.loads(path.read_text()))
    result = run()
    path.write_text(json.dumps(result))
    return result


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    runs = {"dense (continued)": out["dense"], **{f"MoE {k}": v for k, v in out["moe"].items()}}
    for name, run in runs.items():
        points = [(f, v) for f, v in run["curve"] if v is not None]
        ax.plot([f for f, _ in points], [v for _, v in points], label=name,
                linewidth=2.2 if name.startswith("dense") else 1.3, color="black" if name.startswith("dense") else None)
    same = out["dense_same_steps"]
    ax.plot([f for f, v in same["curve"] if v is not None], [v for _, v in same["curve"] if v is not None],
            label=f"dense, {same['steps']} steps (the MoE's step count)", color="grey", linewidth=1.2, linestyle="--")
    ax.axhline(out["dense"]["final_val_loss"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("additional training FLOPs after growth")
    ax.set_ylabel("validation loss")
    ax.set_title("Scale-Out: upcycled 8x top-2 MoE options vs continued dense (tiny-large, CPU)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-steps", type=int, default=200)
    ap.add_argument("--large-steps", type=int, default=240)
    ap.add_argument("--moe-steps", type=int, default=160)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--lr", type=float, default=2e-3, help="lr of the large-model, dense and MoE runs")
    ap.add_argument("--capacity-steps", type=int, default=0,
                    help="also train dense and MoE from scratch this many steps (0: skip)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--output", default=str(RESULTS / "scale_out.json"))
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    import ray

    from data_pipeline.config import sample_config
    from data_pipeline.run import prepare_data

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-out-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    data_dir = str(prepare_data(sample_config(str(work / "data"))))
    bench = Bench(work, data_dir, args.eval_every)

    def grown_and_trained() -> dict[str, Any]:
        small = bench.train("small", bench.model("tiny"), args.small_steps, 3e-3)
        grown = work / "grown"
        run_scale_up(small["checkpoint"], grown, GrowthConfig(method="aki-pro"), bench.model("tiny-large"),
                     local=True)
        return bench.train("large", load_config(grown), args.large_steps, args.lr, "checkpoint", str(grown),
                           data_start=small["data_position"], start_loss=bench.val_loss(str(grown)))

    base = cached(work / "base.json", grown_and_trained)
    dense_cfg, start = load_config(base["checkpoint"]), base["data_position"]

    def upcycled_and_trained(name: str) -> dict[str, Any]:
        fields = dict(VARIANTS[name])
        cfg = moe_config(dense_cfg, 8, 2, fields.pop("granularity", 1), **fields)
        upcycled = work / f"upcycled-{name}"
        run_scale_out(base["checkpoint"], upcycled, cfg, local=True)
        return {"options": VARIANTS[name], **bench.train(
            f"moe-{name}", cfg, args.moe_steps, args.lr, "checkpoint", str(upcycled), data_start=start,
            start_loss=bench.val_loss(str(upcycled)))}

    moe = {name: cached(work / f"moe-{name}.json", lambda name=name: upcycled_and_trained(name))  # type: ignore[misc]
           for name in variants}
    reference = moe.get("default", next(iter(moe.values())))
    dense_steps = round(args.moe_steps * reference["flops_per_step"] / base["flops_per_step"])
    dense = cached(work / f"dense-{dense_steps}.json", lambda: bench.train(
        "dense-continued", dense_cfg, dense_steps, args.lr, "checkpoint", base["checkpoint"], data_start=start,
        start_loss=base["final_val_loss"]))
    same_steps = cached(work / f"dense-{args.moe_steps}.json", lambda: bench.train(
        "dense-same-steps", dense_cfg, args.moe_steps, args.lr, "checkpoint", base["checkpoint"], data_start=start,
        start_loss=base["final_val_loss"]))
    target = dense["final_val_loss"]
    for run in moe.values():
        run["val_loss_minus_dense_same_steps"] = round(run["final_val_loss"] - same_steps["final_val_loss"], 4)
        reached = flops_to_reach(run["curve"], target)
        run["flops_to_dense_final_loss"] = reached
        run["moe_flops_to_dense_loss_ratio"] = None if reached is None else round(reached / dense["flops"], 4)
        run["flops_per_step_over_dense"] = round(run["flops_per_step"] / base["flops_per_step"], 4)
        # the other way round: the dense FLOPs that reached this MoE's final loss, over the MoE's FLOPs (< 1: dense
        # got there cheaper)
        dense_reached = flops_to_reach(dense["curve"], run["final_val_loss"])
        run["dense_flops_to_moe_final_loss_ratio"] = (None if dense_reached is None
                                                     else round(dense_reached / run["flops"], 4))
    ratios = {k: v["moe_flops_to_dense_loss_ratio"] for k, v in moe.items()}
    reaching = {k: r for k, r in ratios.items() if r is not None}
    best = (min(reaching, key=lambda k: reaching[k]) if reaching
            else min(moe, key=lambda k: moe[k]["final_val_loss"]))
    capacity = None
    if args.capacity_steps:  # the same shapes from random init: does an MoE learn more per step here at all?
        def scratch(name: str, cfg: Any) -> dict[str, Any]:
            return cached(work / f"scratch-{name}-{args.capacity_steps}.json",
                          lambda: bench.train(f"scratch-{name}", cfg, args.capacity_steps, 3e-3, data_start=0))
        fresh = {"dense": scratch("dense", dense_cfg), "moe": scratch("moe", moe_config(dense_cfg, 8, 2))}
        capacity = {"steps": args.capacity_steps, "lr": 3e-3,
                    **{f"{k}_final_val_loss": v["final_val_loss"] for k, v in fresh.items()},
                    "moe_minus_dense": round(fresh["moe"]["final_val_loss"] - fresh["dense"]["final_val_loss"], 4),
                    "curves": {k: v["curve"] for k, v in fresh.items()}}
    out = {
        "benchmark": "scale_out", "machine": f"{platform.machine()}, 2 CPUs", "corpus": "bundled sample",
        "models": {"dense": dense_cfg.describe()}, "lr": args.lr, "batch_tokens": 16 * 128,
        "budget": {"small_steps": args.small_steps, "large_steps": args.large_steps, "moe_steps": args.moe_steps,
                   "dense_steps": dense_steps, "dense_flops": dense["flops"], "eval_every": args.eval_every},
        "dense_final_val_loss": target, "dense": dense, "dense_same_steps": same_steps, "moe": moe,
        "per_step_gain_needed": round(reference["flops_per_step"] / base["flops_per_step"] / GOAL, 4),
        "capacity_check": capacity,
        "moe_flops_to_dense_loss_ratio": ratios, "best": best,
        "best_moe_flops_to_dense_loss_ratio": ratios[best],
        "goal": f"the best MoE option reaches the dense run's final validation loss with <= {GOAL}x its FLOPs",
        "goal_met": ratios[best] is not None and ratios[best] <= GOAL,
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    plot(out, Path(args.output).with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("budget", "dense_final_val_loss", "moe_flops_to_dense_loss_ratio", "best",
                                          "goal_met", "per_step_gain_needed", "seconds")}, indent=2))
    print(f"dense, {args.moe_steps} steps: {same_steps['final_val_loss']:.4f}")
    print({k: (round(v["final_val_loss"], 4), v["dense_flops_to_moe_final_loss_ratio"],
               v["val_loss_minus_dense_same_steps"]) for k, v in moe.items()})
    if capacity:
        print("from scratch:", {k: v for k, v in capacity.items() if k != "curves"})
    ray.shutdown()


if __name__ == "__main__":
    main()

"""The Scale-Out study: does the upcycled MoE beat simply continuing the dense model, and under which option?

From one grown dense checkpoint (tiny trained, grown to tiny-large with AKI-Pro, trained: the recipe's path,
as in bench/efficientscale.py) it trains continued dense, and the upcycled MoE (8 experts top-2 unless the
option says otherwise) once per recipe option (``VARIANTS``), all with the same schedule, batch and data
position, through the real trainer (Ray Train, DeepSpeed, 1 CPU worker). Validation loss is measured every
``--eval-every`` steps against cumulative training FLOPs. The budget is the default MoE's FLOPs over
``--moe-steps``; every run spends it, so each runs that budget over its own FLOPs per step (the dense run and
the fine-grained variants, whose active FLOPs are the dense model's, run more steps than the default MoE). For
each MoE option the result is ``moe_flops_to_dense_loss_ratio``: the FLOPs at which its curve first reaches
the dense run's final validation loss, over the dense run's FLOPs (goal <= 0.8; None: not reached within its
budget). Writes ``bench/results/scale_out.json`` and ``.png`` (``--output``).

A diagnostic says why an option misses the goal: a dense run of the option's step count and schedule
gives its gain per *step* (``val_loss_minus_dense_same_steps``, < 0: the MoE learned more per step). An
option that costs ``flops_per_step_over_dense`` per step must reach the dense loss in
``per_step_gain_needed`` times fewer steps to meet the goal, which it cannot where it learns no more per
step than the dense model. ``--scratch-steps N`` also trains the dense model and the default MoE from random
init for N steps (``from_scratch``): whether a fresh MoE learns more per step at this size at all.

``--seeds 0,1,2`` runs every option once per upcycling seed (router init and re-drawn units; data order and
schedule stay) and reports the median ratio: near the end of a budget the curves are flat, so where they
cross moves by a few hundredths between seeds.

    python bench/scale_out.py [--moe-steps 160] [--variants default,granular_g2,...] [--seeds 0,1,2]
                              [--scratch-steps 900] [--work DIR] [--output F]

With ``--work DIR`` every finished run is kept (DIR/base.json, DIR/moe-NAME[-seedS]-STEPS.json,
DIR/dense-STEPS.json, DIR/scratch-*-STEPS.json): a rerun, e.g. with more variants, seeds or another budget,
trains only what is new.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientscale import RESULTS, Bench, flops_to_reach  # bench/efficientscale.py: the same runs and curves

from aquila_ray.checkpoint import load_config
from aquila_ray.config import ModelConfig
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.pipeline.tasks import run_scale_out, run_scale_up
from aquila_ray.upcycle import UpcycleOptions, moe_config

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # the `aquilamoe` MoE preset: topk_then_softmax, batch aux loss 0.001, z-loss 0.01, dropless
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
    # fine-grained: 32 experts of width F/4, top-4 (the dense model's active FLOPs; 8 virtual groups of the
    # whole MLP, 2410.07524), as is and with Drop-Upcycling plus ST-MoE's z-loss coefficient 1e-3
    "fine_grained": {"num_experts": 32, "top_k": 4, "granularity": 4},
    # the best: the `fine-grained-drop` MoE preset, the tiny recipe's Scale-Out
    "fine_grained_drop": {"num_experts": 32, "top_k": 4, "granularity": 4, "drop_upcycling_ratio": 0.5,
                          "z_loss_coeff": 0.001},
    "fine_grained_drop_z0.01": {"num_experts": 32, "top_k": 4, "granularity": 4, "drop_upcycling_ratio": 0.5},
    # the same with no z-loss at all, and with a finer split (40 experts of width F/5, top-5: G = 5, the largest
    # divisor of tiny-large's F = 220 up to 8; 2410.07524's best was 64 experts top-8)
    "fine_grained_drop_z0": {"num_experts": 32, "top_k": 4, "granularity": 4, "drop_upcycling_ratio": 0.5,
                             "z_loss_coeff": 0.0},
    "finer_grained_drop": {"num_experts": 40, "top_k": 5, "granularity": 5, "drop_upcycling_ratio": 0.5,
                           "z_loss_coeff": 0.001},
}
GOAL = 0.8
PER_SEED = ("final_val_loss", "moe_flops_to_dense_loss_ratio", "val_loss_minus_dense_same_steps")
SEQ_LEN = 128  # the sample corpus's sequences (the FLOPs per token's attention term)


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
    seed = "" if len(out["seeds"]) == 1 else f", seed {out['seeds'][0]} of {len(out['seeds'])}"
    runs = {"dense (continued)": out["dense"], **{f"MoE {k}{seed}": v for k, v in out["moe"].items()}}
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
    ax.set_title(f"Scale-Out: upcycled MoE options vs continued dense (tiny-large, CPU; {out['budget']['moe_steps']} "
                 f"MoE steps' FLOPs)", fontsize=10)
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
    ap.add_argument("--scratch-steps", type=int, default=0,
                    help="also train the dense model and the default MoE from random init this many steps (0: skip)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--seeds", default="0",
                    help="comma-separated upcycling seeds (router init, re-drawn units); each option runs once per "
                         "seed and reports the median ratio over them")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--output", default=str(RESULTS / "scale_out.json"))
    args = ap.parse_args()
    variants = args.variants.split(",")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
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

    def variant(name: str) -> ModelConfig:
        fields = dict(VARIANTS[name])
        return moe_config(dense_cfg, int(fields.pop("num_experts", 8)), int(fields.pop("top_k", 2)),
                          int(fields.pop("granularity", 1)), **fields)

    # the budget: the default MoE's FLOPs over --moe-steps; every run gets the steps that spend it
    budget_per_token = args.moe_steps * variant("default").flops_per_token(SEQ_LEN)

    def steps_for(cfg: ModelConfig) -> int:
        return round(budget_per_token / cfg.flops_per_token(SEQ_LEN))

    def run_name(name: str, seed: int) -> str:
        return name if seed == 0 else f"{name}-seed{seed}"  # seed 0 keeps the names of earlier work directories

    def upcycled_and_trained(name: str, seed: int) -> dict[str, Any]:
        cfg, run = variant(name), run_name(name, seed)
        upcycled = work / f"upcycled-{run}"
        run_scale_out(base["checkpoint"], upcycled, cfg, UpcycleOptions(seed=seed), local=True)
        return {"options": VARIANTS[name], "seed": seed, **bench.train(
            f"moe-{run}-{steps_for(cfg)}", cfg, steps_for(cfg), args.lr, "checkpoint", str(upcycled),
            data_start=start, start_loss=bench.val_loss(str(upcycled)))}

    by_seed = {name: {seed: cached(work / f"moe-{run_name(name, seed)}-{steps_for(variant(name))}.json",
                                   lambda name=name, seed=seed: upcycled_and_trained(name, seed))  # type: ignore[misc]
                      for seed in seeds}
               for name in variants}

    def continued_dense(steps: int) -> dict[str, Any]:
        return cached(work / f"dense-{steps}.json", lambda: bench.train(
            f"dense-{steps}", dense_cfg, steps, args.lr, "checkpoint", base["checkpoint"], data_start=start,
            start_loss=base["final_val_loss"]))

    dense_steps = steps_for(dense_cfg)
    dense = continued_dense(dense_steps)
    target = dense["final_val_loss"]
    moe_runs = [r for runs in by_seed.values() for r in runs.values()]
    # the dense model over each MoE's own step count and schedule: the MoE's gain per step
    same_steps = {r["steps"]: continued_dense(r["steps"]) for r in moe_runs}
    for run in moe_runs:
        run["val_loss_minus_dense_same_steps"] = round(
            run["final_val_loss"] - same_steps[run["steps"]]["final_val_loss"], 4)
        run["per_step_gain_needed"] = round(run["flops_per_step"] / base["flops_per_step"] / GOAL, 4)
        reached = flops_to_reach(run["curve"], target)
        run["flops_to_dense_final_loss"] = reached
        run["moe_flops_to_dense_loss_ratio"] = None if reached is None else round(reached / dense["flops"], 4)
        run["flops_per_step_over_dense"] = round(run["flops_per_step"] / base["flops_per_step"], 4)
        # the other way round: the dense FLOPs that reached this MoE's final loss, over the MoE's FLOPs (< 1: dense
        # got there cheaper)
        dense_reached = flops_to_reach(dense["curve"], run["final_val_loss"])
        run["dense_flops_to_moe_final_loss_ratio"] = (None if dense_reached is None
                                                     else round(dense_reached / run["flops"], 4))
    # an option's result: its first seed's run (curve, diagnostics), and the median over the seeds of the ratio
    # (None, never reached, counts as above every number) and of the final loss
    moe = {}
    for name, runs in by_seed.items():
        ratio = statistics.median(r["moe_flops_to_dense_loss_ratio"] or math.inf for r in runs.values())
        moe[name] = {**runs[seeds[0]], "seeds": {s: {f: r[f] for f in PER_SEED} for s, r in runs.items()},
                     "moe_flops_to_dense_loss_ratio": None if math.isinf(ratio) else ratio,
                     "final_val_loss_median": statistics.median(r["final_val_loss"] for r in runs.values())}
    ratios = {k: v["moe_flops_to_dense_loss_ratio"] for k, v in moe.items()}
    reaching = {k: r for k, r in ratios.items() if r is not None}
    best = (min(reaching, key=lambda k: reaching[k]) if reaching
            else min(moe, key=lambda k: moe[k]["final_val_loss_median"]))
    scratch = None
    if args.scratch_steps:  # the same shapes from random init: does a fresh MoE learn more per step here?
        def from_init(name: str, cfg: ModelConfig) -> dict[str, Any]:
            return cached(work / f"scratch-{name}-{args.scratch_steps}.json", lambda: bench.train(
                f"scratch-{name}", cfg, args.scratch_steps, 3e-3, data_start=0))

        fresh = {"dense": from_init("dense", dense_cfg), "moe": from_init("moe", variant("default"))}
        scratch = {"steps": args.scratch_steps, "lr": 3e-3, "moe": "default",
                   **{f"{k}_final_val_loss": v["final_val_loss"] for k, v in fresh.items()},
                   "curves": {k: v["curve"] for k, v in fresh.items()}}
    out = {
        "benchmark": "scale_out", "machine": f"{platform.machine()}, 2 CPUs", "corpus": "bundled sample",
        "models": {"dense": dense_cfg.describe()}, "lr": args.lr, "batch_tokens": 16 * 128,
        "budget": {"small_steps": args.small_steps, "large_steps": args.large_steps, "moe_steps": args.moe_steps,
                   "dense_steps": dense_steps, "dense_flops": dense["flops"], "eval_every": args.eval_every},
        # the plot's dense line of an MoE's step count: the default's, else the first option's (trained above)
        "dense_final_val_loss": target, "dense": dense,
        "dense_same_steps": same_steps[moe.get("default", next(iter(moe.values())))["steps"]],
        "seeds": seeds, "moe": moe, "from_scratch": scratch,
        "moe_flops_to_dense_loss_ratio": ratios, "best": best,
        "best_moe_flops_to_dense_loss_ratio": ratios[best],
        "goal": f"the best MoE option reaches the dense run's final validation loss with <= {GOAL}x its FLOPs",
        "goal_met": ratios[best] is not None and ratios[best] <= GOAL,
        "seconds": round(time.time() - t0, 1),  # this invocation's; cached runs cost it nothing
    }
    # what the results cost to train, cached or not: every run after growth (not the small model)
    trained = [base, dense, *same_steps.values(), *moe_runs, *(fresh.values() if args.scratch_steps else ())]
    out["train_seconds"] = round(sum({r["name"]: r["seconds"] for r in trained}.values()), 1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    plot(out, Path(args.output).with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("budget", "dense_final_val_loss", "moe_flops_to_dense_loss_ratio", "best",
                                          "goal_met", "seconds", "train_seconds")}, indent=2))
    print({k: {f: v[f] for f in ("steps", "final_val_loss_median", "moe_flops_to_dense_loss_ratio",
                                 "dense_flops_to_moe_final_loss_ratio", "val_loss_minus_dense_same_steps",
                                 "per_step_gain_needed", "seeds")} for k, v in moe.items()})
    ray.shutdown()


if __name__ == "__main__":
    main()

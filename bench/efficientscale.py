"""EfficientScale's headline claim on tiny CPU models and the bundled sample corpus, measured in one run.

(1) Scale-Up: FLOPs for the large dense model (tiny-large) to reach a target validation loss when grown from
    the trained small model (tiny) with FPI, AKI and AKI-Pro vs trained from scratch. The target is the
    scratch run's final validation loss. Savings are reported without and with the small model's FLOPs
    (bert2BERT reports ~45% saved, G_stack ~55%).
(2) Scale-Out: the upcycled MoE (``--scale-out``: an MoE preset, by default the tiny recipe's
    ``fine-grained-drop``; ``aquilamoe`` is AquilaMoE's 8x top-2) vs continued dense training of the same grown
    model, at equal additional training FLOPs (the dense run gets as many more steps as the MoE's FLOPs per
    token need).

Every run is the real trainer (``run_training``: Ray Train, DeepSpeed, 1 CPU worker) with the same schedule,
batch and data: the large-model runs all start at the same position of the sample stream (after the small
model's tokens), so scratch and grown runs see the same sequences. Writes ``bench/results/efficientscale.json``
and ``bench/results/efficientscale.png``.

    python bench/efficientscale.py [--small-steps 200] [--large-steps 240] [--moe-steps 120] [--eval-every 20]
                                   [--scale-out fine-grained-drop|aquilamoe]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aquila_ray.checkpoint import load_config
from aquila_ray.config import get_preset
from aquila_ray.config.growth import GrowthConfig, GrowthMethod
from aquila_ray.config.model import ModelConfig
from aquila_ray.config.presets import MOE_PRESETS, get_moe_preset
from aquila_ray.config.train import CheckpointingConfig, OptimizerConfig, ScheduleConfig, TrainConfig, WandbConfig
from aquila_ray.eval import evaluate_checkpoint
from aquila_ray.pipeline.tasks import run_scale_out, run_scale_up
from aquila_ray.pipeline.train_stage import train_stage
from aquila_ray.upcycle import upcycled_config

RESULTS = Path(__file__).resolve().parent / "results"
# bench/data_pipeline.py would shadow the data_pipeline package when this script's folder leads sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != RESULTS.parent]
METHODS: tuple[GrowthMethod, ...] = ("fpi", "aki", "aki-pro")
EVAL_SEQUENCES = 117  # the sample corpus's whole validation split


class Bench:
    def __init__(self, work: Path, data_dir: str, eval_every: int) -> None:
        self.work, self.data_dir, self.eval_every = work, data_dir, eval_every
        self.vocab = json.loads((Path(data_dir) / "manifest.json").read_text())["vocab_size"]

    def model(self, preset: str) -> ModelConfig:
        return dataclasses.replace(get_preset(preset), vocab_size=self.vocab)

    def train(self, name: str, model: ModelConfig, steps: int, lr: float, init: str = "scratch",
              init_from: str | None = None, data_start: int = 0, start_loss: float | None = None) -> dict[str, Any]:
        """One training run; its validation curve starts at ``start_loss`` (the initial checkpoint's, when
        measured) at 0 FLOPs."""
        cfg = TrainConfig(model=model, data_dir=self.data_dir, init=init, init_from=init_from,  # type: ignore[arg-type]
                          data_start=data_start, steps=steps, global_batch_tokens=16 * 128, micro_batch_size=16,
                          optimizer=OptimizerConfig(lr=lr), schedule=ScheduleConfig(warmup_steps=10),
                          checkpoint=CheckpointingConfig(every=steps), eval_every=self.eval_every,
                          eval_max_sequences=EVAL_SEQUENCES, wandb=WandbConfig(enabled=False))
        t0 = time.time()
        trained = train_stage(cfg, str(self.work / "runs"), name, self.work / name)
        rows = trained.rows
        curve = [(0.0, start_loss)] + [(float(r["cumulative_flops"]), float(r["val_loss"])) for r in rows
                                       if "val_loss" in r]
        return {"name": name, "checkpoint": trained.checkpoint, "steps": steps, "seconds": round(time.time() - t0, 1),
                "flops": float(rows[-1]["cumulative_flops"]), "flops_per_step": float(rows[-1]["cumulative_flops"])
                / steps, "curve": curve, "final_val_loss": curve[-1][1], "data_position": trained.data_position}

    def val_loss(self, ckpt: str) -> float:
        return float(evaluate_checkpoint(ckpt, self.data_dir, max_sequences=EVAL_SEQUENCES)["validation"]["loss"])


def flops_to_reach(curve: list[tuple[float, float | None]], target: float) -> float | None:
    """FLOPs where the validation curve first reaches ``target`` (linear between evaluations), or None."""
    prev: tuple[float, float] | None = None
    for f, v in curve:
        if v is None:
            continue
        if v <= target:
            if prev is None or prev[1] == v:
                return f
            (f0, v0) = prev
            return f0 + (f - f0) * (v0 - target) / (v0 - v)
        prev = (f, v)
    return None


def saving(part: float | None, whole: float) -> float | None:
    return None if part is None else round(1.0 - part / whole, 4)


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.3), dpi=120)
    small_flops = out["small"]["flops"]
    for name, run in out["large_runs"].items():
        xs = [f for f, v in run["curve"] if v is not None]
        ys = [v for f, v in run["curve"] if v is not None]
        line, = a.plot(xs, ys, label=name, linewidth=1.6)
        if name != "scratch":
            a.plot([x + small_flops for x in xs], ys, linestyle="--", color=line.get_color(), linewidth=1.0)
    a.axhline(out["scale_up"]["target_val_loss"], color="grey", linewidth=0.8, linestyle=":")
    a.set_xlabel("training FLOPs of the large model (dashed: + the small model's)")
    a.set_ylabel("validation loss")
    a.set_title("Scale-Up: grown vs from scratch (tiny -> tiny-large)")
    a.legend()
    a.grid(True, alpha=0.3)
    for name in ("moe", "dense"):
        run = out["scale_out"][name]
        b.plot([f for f, v in run["curve"] if v is not None], [v for f, v in run["curve"] if v is not None],
               label=f"{name} ({run['steps']} steps)", linewidth=1.6)
    b.set_xlabel("additional training FLOPs")
    b.set_ylabel("validation loss")
    b.set_title(f"Scale-Out: upcycled MoE ({out['scale_out']['preset']}) vs continued dense", fontsize=10)
    b.legend()
    b.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-steps", type=int, default=200)
    ap.add_argument("--large-steps", type=int, default=240)
    ap.add_argument("--moe-steps", type=int, default=120)
    ap.add_argument("--scale-out", choices=sorted(MOE_PRESETS), default="fine-grained-drop",
                    help="the MoE preset to upcycle to (default: the tiny recipe's)")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--small-lr", type=float, default=3e-3)
    ap.add_argument("--large-lr", type=float, default=2e-3)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--output", default=str(RESULTS / "efficientscale.json"))
    args = ap.parse_args()
    import ray

    from data_pipeline.config import sample_config
    from data_pipeline.run import prepare_data

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-es-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    data_dir = str(prepare_data(sample_config(str(work / "data"))))
    bench = Bench(work, data_dir, args.eval_every)
    small = bench.train("small", bench.model("tiny"), args.small_steps, args.small_lr)
    start = small["data_position"]
    large = bench.model("tiny-large")
    runs = {"scratch": bench.train("scratch", large, args.large_steps, args.large_lr, data_start=start)}
    grown_loss = {}
    for m in METHODS:
        dst = work / f"grown-{m}"
        report = run_scale_up(small["checkpoint"], dst, GrowthConfig(method=m), large, local=True)
        grown_loss[m] = {"depth_mode": report["depth_mode"], "val_loss_after_growth": bench.val_loss(str(dst))}
        runs[m] = bench.train(f"large-{m}", load_config(dst), args.large_steps, args.large_lr, "checkpoint",
                              str(dst), data_start=start, start_loss=grown_loss[m]["val_loss_after_growth"])
    target = runs["scratch"]["final_val_loss"]
    scratch_flops = runs["scratch"]["flops"]
    scale_up = {"target_val_loss": target, "target": "the scratch run's final validation loss",
                "scratch_flops": scratch_flops, "small_flops": small["flops"], "methods": {}}
    for m in METHODS:
        f = flops_to_reach(runs[m]["curve"], target)
        scale_up["methods"][m] = {
            **grown_loss[m], "final_val_loss": runs[m]["final_val_loss"], "flops_to_target": f,
            "saving_vs_scratch": saving(f, scratch_flops),
            "saving_vs_scratch_counting_small": saving(None if f is None else f + small["flops"], scratch_flops)}

    # Scale-Out: from the AKI-Pro-grown model (the recipe's path), equal additional FLOPs
    base = runs["aki-pro"]
    dense_cfg = load_config(base["checkpoint"])
    moe_cfg = upcycled_config(dense_cfg, get_moe_preset(args.scale_out))
    moe_dir = work / "upcycled"
    run_scale_out(base["checkpoint"], moe_dir, moe_cfg, local=True)
    start2 = base["data_position"]
    moe = bench.train("moe", moe_cfg, args.moe_steps, args.large_lr, "checkpoint", str(moe_dir), data_start=start2,
                      start_loss=bench.val_loss(str(moe_dir)))
    dense_steps = round(args.moe_steps * moe["flops_per_step"] / base["flops_per_step"])
    dense = bench.train("dense-continued", dense_cfg, dense_steps, args.large_lr, "checkpoint", base["checkpoint"],
                        data_start=start2, start_loss=base["final_val_loss"])
    scale_out = {"base": "the AKI-Pro-grown large model after its training", "preset": args.scale_out,
                 "moe": moe, "dense": dense,
                 "moe_flops_per_step_over_dense": round(moe["flops_per_step"] / base["flops_per_step"], 4),
                 "moe_final_val_loss": moe["final_val_loss"], "dense_final_val_loss": dense["final_val_loss"],
                 "flops_ratio_dense_over_moe": round(dense["flops"] / moe["flops"], 4),
                 "dense_flops_to_moe_loss": flops_to_reach(dense["curve"], moe["final_val_loss"])}
    out = {"benchmark": "efficientscale", "machine": f"{platform.machine()}, 2 CPUs", "corpus": "bundled sample",
           "models": {"small": bench.model("tiny").describe(), "large": large.describe(),
                      "moe": moe_cfg.describe()},
           "steps": {"small": args.small_steps, "large": args.large_steps, "moe": args.moe_steps,
                     "dense_continued": dense_steps}, "batch_tokens": 16 * 128, "lr": [args.small_lr, args.large_lr],
           "eval_every": args.eval_every, "eval_sequences": EVAL_SEQUENCES,
           "small": small, "large_runs": runs, "scale_up": scale_up, "scale_out": scale_out,
           "paper_reference": {"bert2BERT_saving": 0.45, "G_stack_saving": 0.55},
           "seconds": round(time.time() - t0, 1)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    plot(out, Path(args.output).with_suffix(".png"))
    print(json.dumps({"scale_up": scale_up, "scale_out": {k: v for k, v in scale_out.items()
                                                          if k not in ("moe", "dense")}}, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()

"""The run report: ``report.json`` (per stage and per transition) and ``loss_vs_flops.png``, rebuilt by
``write_report`` from the typed stage results after every run of the pipeline.

Transitions are measured the way the AquilaMoE paper's figure reads them: validation loss of the last
checkpoint before the transition, of the transformed checkpoint before any training on it ("just after"),
and the number of training steps the next stage needs before its (smoothed) training loss is back at the
previous stage's final (smoothed) training loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aquila_ray.config.recipe import STAGE_FIELDS
from aquila_ray.pipeline.results import StageResult
from aquila_ray.pipeline.stages import completed, stage_dir
from aquila_ray.train.metrics import read_metrics

SMOOTH = 0.9
REPORT_NAME = "report.json"
PLOT_NAME = "loss_vs_flops.png"


def ema(values: list[float], beta: float = SMOOTH) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def steps_to_recover(losses: list[float], target: float) -> int | None:
    """First step (1-based) whose smoothed loss is <= target, or None if the stage never got there."""
    for i, v in enumerate(ema(losses)):
        if v <= target:
            return i + 1
    return None


def build_report(train_stages: list[dict[str, Any]], transitions: list[dict[str, Any]]) -> dict[str, Any]:
    """``train_stages``: per stage {name, metrics: rows, validation_loss, ...}; ``transitions``: per transform
    {name, from_stage, to_stage, method, loss_before, loss_after, probe}. Adds recovery steps and the overall
    summary."""
    by_name = {s["name"]: s for s in train_stages}
    stages_out = []
    for s in train_stages:
        rows = [r for r in s.get("metrics", []) if "loss" in r]
        losses = [float(r["loss"]) for r in rows]
        stages_out.append({
            "name": s["name"],
            "model": s.get("model"),
            "steps": len(rows),
            "tokens": rows[-1].get("consumed_tokens") if rows else 0,
            "flops": rows[-1].get("cumulative_flops") if rows else 0.0,
            "start_loss": losses[0] if losses else None,
            "end_loss": losses[-1] if losses else None,
            "end_loss_smoothed": ema(losses)[-1] if losses else None,
            "validation_loss": s.get("validation_loss"),
        })
    out_by_name = {s["name"]: s for s in stages_out}
    trans_out = []
    for t in transitions:
        before, after = t.get("loss_before"), t.get("loss_after")
        prev = out_by_name.get(t["from_stage"], {})
        nxt = by_name.get(t["to_stage"], {})
        next_losses = [float(r["loss"]) for r in nxt.get("metrics", []) if "loss" in r]
        target = prev.get("end_loss_smoothed")
        trans_out.append({
            **t,
            "relative_change": (after - before) / before if before and after is not None else None,
            "train_loss_before": target,
            "train_loss_first_step_after": next_losses[0] if next_losses else None,
            "steps_to_recover": steps_to_recover(next_losses, target) if target is not None else None,
        })
    return {"stages": stages_out, "transitions": trans_out}


def plot_loss_vs_flops(train_stages: list[dict[str, Any]], path: str | Path) -> Path:
    """Training loss against cumulative training FLOPs (log x), one colour per stage (the seed's figure)."""
    # deferred: matplotlib (~0.75 s) only to plot, and its backend must be set to Agg before pyplot loads
    # (at the top it would switch the backend of every program importing this module)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    offset = 0.0
    for s in train_stages:
        rows = [r for r in s.get("metrics", []) if "loss" in r and "cumulative_flops" in r]
        if not rows:
            continue
        # each stage's FLOPs continue from the previous stage's total: the recipe's compute so far
        x = [offset + float(r["cumulative_flops"]) for r in rows]
        ax.plot(x, ema([float(r["loss"]) for r in rows]), label=s["name"], linewidth=1.6)
        offset = x[-1]
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (cumulative over stages)")
    ax.set_ylabel(f"training loss (EMA {SMOOTH})")
    ax.set_title("EfficientScale: loss vs compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_report(root: Path, outs: dict[str, Any]) -> dict[str, Any]:
    """report.json and loss_vs_flops.png from the stages done so far (their typed results, by name)."""
    train_stages = []
    for name in STAGE_FIELDS:
        if name not in outs:
            continue
        stage: StageResult = outs[name]
        train_stages.append({"name": name, "model": stage.model,
                             "metrics": read_metrics(stage_dir(root, name) / "metrics.jsonl"),
                             "validation_loss": stage.validation.loss if stage.validation else stage.validation_loss})
    transitions = []
    for t, a, b in (("scale_up", "train_small", "train_large"), ("scale_out", "train_large", "train_moe")):
        if t in outs:
            after = outs[b].validation_start if b in outs else None
            transitions.append({"name": t, "from_stage": a, "to_stage": b, "method": outs[t].method,
                                "loss_before": outs[t].loss_before,
                                "loss_after": after.loss if after is not None else None, "probe": outs[t].probe})
    report = build_report(train_stages, transitions)
    report["stage_seconds"] = {k: (completed(root, k) or {}).get("seconds") for k in outs}
    if "evaluate" in outs:
        report["evaluation"] = outs["evaluate"].results
    (root / REPORT_NAME).write_text(json.dumps(report, indent=2))
    if any(s["metrics"] for s in train_stages):
        plot_loss_vs_flops(train_stages, root / PLOT_NAME)
    return report

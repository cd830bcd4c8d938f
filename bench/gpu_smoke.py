"""GPU smoke test of the real trainer: on one GPU, in bf16 (``scaling.use_gpu=true``, ZeRO-1), a dense run and an
MoE run through ``aquila_ray.train.run_training`` on a local Ray cluster, each saving sharded checkpoints and
resuming from one after a worker is killed.

Each run trains ``--steps`` steps with a checkpoint every ``--checkpoint-every``; rank 0 SIGKILLs itself once
before step ``--kill-at`` (``fault_injection=0@K``) and Ray Train restarts the worker group
(``max_failures=1``), which resumes from the last registered checkpoint. Per run it reports the steps, the
final loss, median tokens/s and MFU from metrics.jsonl (the first ``--skip`` steps after each start left
out; MFU against ``peak_flops_per_worker``, by default the H100/H200 bf16 dense peak 989 TFLOP/s), whether
the restarted group continued from the checkpoint (its first step is the checkpoint's step + 1 and the
metrics read as one continuous curve), and that the final checkpoint opens with ``aquila_ray.load_model``
(parameter count, a finite loss on validation rows). Results go to bench/results/gpu_smoke.json.

Exit codes: 0 every check passed; 1 a check failed or a run raised (the summary says which; the run
directories are kept); 77 skipped: no CUDA device is visible to torch, or it has no bf16 (77 is the
automake/meson "skipped" code; nothing was run).

    python bench/gpu_smoke.py [--steps 30] [--checkpoint-every 10] [--kill-at 15] [--seq 256] [--batch 16]
                              [--dense-preset demo-small] [--moe-preset tiny-moe]

``--cpu-check`` runs the same flow on CPU in fp32 (one worker runs ZeRO-0) to check the script itself on a
machine without a GPU; its numbers mean nothing and it writes no results unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

EXIT_OK, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 77
REPO = Path(__file__).resolve().parents[1]


def gpu_missing() -> str | None:
    """Why this machine cannot run the smoke test, or None when it can."""
    if not torch.cuda.is_available():
        return (f"no CUDA device is visible to torch {torch.__version__} (torch.cuda.is_available() is False); "
                f"run bench/gpu_smoke.py on a machine with an NVIDIA GPU and a CUDA build of torch")
    if not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(0)} has no bf16 support; the GPU path trains in bf16"
    return None


def smoke_run(name: str, preset: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run of the real trainer with a kill and a resume; what it did and the checks on it."""
    from aquila_ray import load_model
    from aquila_ray.config.presets import get_preset
    from aquila_ray.config.train import build_train_config
    from aquila_ray.data.dataset import TokenDataset
    from aquila_ray.data.synthetic import write_synthetic_shards
    from aquila_ray.train import run_training
    from aquila_ray.train.metrics import read_metrics

    model = get_preset(preset)
    seq = min(args.seq, model.max_seq_len)
    data_dir = write_synthetic_shards(work / f"data-{name}", num_train=max(1024, args.batch * args.steps),
                                      num_validation=64, seq_len=seq, vocab_size=model.vocab_size, num_shards=4)
    use_gpu = "false" if args.cpu_check else "true"
    overrides = [f"global_batch_tokens={args.batch * seq}", f"micro_batch_size={args.batch}", f"steps={args.steps}",
                 f"checkpoint.every={args.checkpoint_every}", f"fault_injection=0@{args.kill_at}",
                 "scaling.max_failures=1", "scaling.num_workers=1", f"scaling.use_gpu={use_gpu}",
                 "scaling.zero_stage=1", "wandb.enabled=false", "eval_every=0", "optimizer.lr=1e-3",
                 "schedule.warmup_steps=5", f"log_every={max(1, args.steps // 10)}"]
    cfg = build_train_config({"model": preset, "data_dir": str(data_dir)}, overrides)
    t0 = time.time()
    result = run_training(cfg, work / "runs", name)
    wall_s = time.time() - t0

    run_dir = Path(result.run_dir)
    rows = read_metrics(result.metrics_path)
    marker = run_dir / f"fault_injection-rank0-step{args.kill_at}.json"
    killed = json.loads(marker.read_text()) if marker.is_file() else None
    checkpoint_step = (args.kill_at - 1) // args.checkpoint_every * args.checkpoint_every
    after_kill = [r for r in rows if killed is not None and r["time"] > killed["time"]]
    resumed_at = after_kill[0]["step"] if after_kill else None
    steps = [r["step"] for r in rows]
    # a restarted group's first steps pay for start-up (CUDA context, allocator warm-up) again
    steady = [r for r in rows
              if r["step"] > args.skip and not checkpoint_step < r["step"] <= checkpoint_step + args.skip]

    # The last checkpoint holds the model export (written at the last step): open it as a user would.
    ckpt: dict[str, Any] = {"path": result.checkpoint_path, "params": None, "validation_loss_fp32": math.nan}
    if result.checkpoint_path is not None:
        loaded = load_model(result.checkpoint_path)
        val = torch.from_numpy(TokenDataset(data_dir, "validation").get(np.arange(8)))
        with torch.no_grad():
            loss = float(loaded(val[:, :-1], labels=val[:, 1:]).loss)
        ckpt.update({"params": sum(p.numel() for p in loaded.parameters()), "expected_params": model.num_params(),
                     "validation_loss_fp32": loss, "run_val_loss": rows[-1].get("val_loss") if rows else None})
    checks = {
        "killed_and_restarted": killed is not None,
        "resumed_from_checkpoint": resumed_at == checkpoint_step + 1 and checkpoint_step > 0,
        "one_continuous_curve": steps == list(range(1, args.steps + 1)),
        "loss_finite": bool(rows) and all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows),
        "loss_decreased": bool(rows) and rows[-1]["loss"] < rows[0]["loss"],
        "checkpoint_opens": ckpt["params"] == model.num_params() and math.isfinite(ckpt["validation_loss_fp32"]),
    }
    return {
        "run": name, "preset": preset, "model": model.describe(), "seq_len": seq, "global_batch_sequences": args.batch,
        "steps": rows[-1]["step"] if rows else 0, "final_loss": rows[-1]["loss"] if rows else None,
        "first_loss": rows[0]["loss"] if rows else None, "final_val_loss": rows[-1].get("val_loss") if rows else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "mfu": statistics.median(r["mfu"] for r in steady) if steady else None,
        "step_time_s": statistics.median(r["step_time_s"] for r in steady) if steady else None,
        "killed_before_step": args.kill_at, "checkpoint_step": checkpoint_step, "resumed_at_step": resumed_at,
        "wall_s": wall_s, "checkpoint": ckpt, "checks": checks, "passed": all(checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--kill-at", type=int, default=15, help="rank 0 kills itself before this step, once")
    parser.add_argument("--seq", type=int, default=256, help="sequence length (capped at the preset's max_seq_len)")
    parser.add_argument("--batch", type=int, default=16, help="global batch in sequences (one micro-batch)")
    parser.add_argument("--skip", type=int, default=3, help="steps after each start left out of tokens/s and MFU")
    parser.add_argument("--dense-preset", default="demo-small")
    parser.add_argument("--moe-preset", default="tiny-moe")
    parser.add_argument("--workdir", default=None, help="runs and data go here (default: a new temp dir)")
    parser.add_argument("--cpu-check", action="store_true", help="check the script on CPU (fp32); numbers mean nothing")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/gpu_smoke.json on GPU)")
    args = parser.parse_args()
    if not 0 < args.checkpoint_every < args.kill_at <= args.steps:
        parser.error(f"need 0 < --checkpoint-every ({args.checkpoint_every}) < --kill-at ({args.kill_at}) <= --steps "
                     f"({args.steps}), so that a checkpoint exists before the kill")
    reason = None if args.cpu_check else gpu_missing()
    if reason is not None:
        print(f"gpu_smoke: SKIPPED (exit {EXIT_SKIPPED}): {reason}", flush=True)
        return EXIT_SKIPPED
    out = args.out or (None if args.cpu_check else str(Path(__file__).parent / "results" / "gpu_smoke.json"))

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a local single-machine cluster only
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # notice the killed worker quickly
    ray.init(address="local", num_cpus=min(8, os.cpu_count() or 1), num_gpus=0 if args.cpu_check else 1,
             include_dashboard=False, log_to_driver=True)
    runs = []
    try:
        for name, preset in (("dense", args.dense_preset), ("moe", args.moe_preset)):
            try:
                runs.append(smoke_run(name, preset, args, work))
            except Exception:  # record it and go on: the other run's result is still worth the GPU time
                runs.append({"run": name, "preset": preset, "passed": False, "checks": {"completed": False},
                             "error": traceback.format_exc(limit=-8)})
                print(f"gpu_smoke: the {name} run failed:\n{runs[-1]['error']}", flush=True)
    finally:
        ray.shutdown()

    device = "cpu (--cpu-check)" if args.cpu_check else torch.cuda.get_device_name(0)
    print(f"\n{'run':<6} {'steps':>5} {'final loss':>10} {'tokens/s':>10} {'MFU':>7} {'resumed at':>10} "
          f"{'ckpt opens':>10} {'passed':>6}   ({device})")
    for r in runs:
        if "error" in r:
            print(f"{r['run']:<6} failed before its checks: {r['error'].strip().splitlines()[-1]}")
            continue
        mfu = f"{100 * r['mfu']:6.2f}%" if r["mfu"] is not None else "    n/a"
        tps = f"{r['tokens_per_s']:10.0f}" if r["tokens_per_s"] is not None else "       n/a"
        loss = f"{r['final_loss']:10.4f}" if r["final_loss"] is not None else "       n/a"
        print(f"{r['run']:<6} {r['steps']:>5} {loss} {tps} {mfu} "
              f"{r['resumed_at_step']!s:>10} {r['checks']['checkpoint_opens']!s:>10} {r['passed']!s:>6}")
        for check, ok in r["checks"].items():
            if not ok:
                print(f"  FAILED {r['run']}: {check}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "gpu_smoke", "commit": commit, "device": device, "torch": torch.__version__,
        "cuda": torch.version.cuda, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "args": vars(args), "runs": runs, "passed": all(r["passed"] for r in runs),
        "notes": "one Ray Train worker on one GPU, bf16 with fp32 gradient accumulation, ZeRO-1; tokens/s and MFU "
                 "are medians of the metrics rows (the trainer's step timer) after the first --skip steps of "
                 "each start; MFU uses peak_flops_per_worker (default 989e12, H100/H200 bf16 dense).",
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    if args.workdir is None and result["passed"]:
        shutil.rmtree(work)
    else:
        print(f"runs, metrics and checkpoints kept in {work}")
    return EXIT_OK if result["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

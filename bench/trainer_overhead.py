"""Trainer overhead: steady-state tokens/s of ``jobs.train`` (1 Ray Train worker, DeepSpeed, fp32 CPU)
vs a bare PyTorch loop over the same model, data, batch, optimizer, clipping and thread count, in one run.

Bare loop and trainer alternate for ``--rounds`` rounds (noise on a shared machine hits both); each round
gives a ratio of medians and the median ratio is reported. The trainer's throughput is taken from the
wall-clock gaps between consecutive metrics.jsonl rows, so it includes
everything a step costs (data, DeepSpeed, metrics all-reduce, metrics.jsonl, offline W&B). Also reported:
start-up (``run_training`` called -> first step starts) and recovery (a worker SIGKILLed -> the restarted
group starts its next step, and finishes it). Goal: ratio >= 0.9.

    python bench/trainer_overhead.py [--preset demo-small] [--seq 256] [--batch 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aquila_ray.config import to_dict
from aquila_ray.config.train import TrainConfig, build_train_config
from aquila_ray.data.dataset import TokenDataset, rank_batch
from aquila_ray.data.synthetic import write_synthetic_shards
from aquila_ray.model import build_model
from aquila_ray.train import run_training
from aquila_ray.train.engine import param_groups
from aquila_ray.train.metrics import read_metrics
from aquila_ray.train.schedule import lr_at


def bare_loop(cfg: TrainConfig, steps: int, threads: int) -> list[float]:
    """Seconds per step of a plain loop: same init, data order, micro-batching, AdamW, clipping, schedule."""
    torch.set_num_threads(threads)
    data = TokenDataset(cfg.data_dir)
    batch = cfg.batch_sequences(data.seq_len)
    model = build_model(cfg.model, seed=cfg.seed).train()
    o = cfg.optimizer
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            foreach=False)
    accum = batch // cfg.micro_batch_size
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, o.lr, cfg.schedule, cfg.steps)
        _, rows = rank_batch(data, cfg.seed, step * batch, batch, 0, 1)
        x = torch.from_numpy(rows)
        for m in range(accum):
            mb = x[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]
            (model(mb[:, :-1], labels=mb[:, 1:]).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo-small")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch in sequences")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="trainer steps per round (bare: the same)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the steady state")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "trainer_overhead.json"))
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    tmp = Path(tempfile.mkdtemp(prefix="trainer-overhead-"))
    data_dir = write_synthetic_shards(tmp / "data", num_train=1024, num_validation=16, seq_len=args.seq,
                                      vocab_size=8192, num_shards=4)
    overrides = [f"global_batch_tokens={args.batch * args.seq}", f"micro_batch_size={args.micro_batch}",
                 f"steps={args.steps}", f"checkpoint.every={args.steps}", "eval_every=-1", "log_every=10",
                 f"scaling.cpus_per_worker={args.threads}", "wandb.mode=offline", "optimizer.lr=1e-3",
                 "schedule.warmup_steps=5"]
    cfg = build_train_config({"model": args.preset, "data_dir": str(data_dir)}, overrides)

    tokens = args.batch * args.seq
    ray.init(address="local", num_cpus=args.threads + 2, include_dashboard=False, log_to_driver=False)
    rounds, startups = [], []
    for i in range(args.rounds):
        bare_times = bare_loop(cfg, args.steps, args.threads)[args.warmup:]
        t_call = time.time()
        run_training(cfg, tmp / "runs", f"overhead-{i}")
        rows = read_metrics(tmp / "runs" / f"overhead-{i}" / "metrics.jsonl")
        startups.append(rows[0]["time"] - rows[0]["step_time_s"] - t_call)
        steady = rows[args.warmup:]
        gaps = [b["time"] - a["time"] for a, b in zip(steady, steady[1:], strict=False)]
        bare = tokens / statistics.median(bare_times)
        wall = tokens / statistics.median(gaps)
        step = tokens / statistics.median(r["step_time_s"] for r in steady)
        rounds.append({"bare_pytorch": bare, "jobs_train_wall": wall, "jobs_train_step": step,
                       "ratio_wall": wall / bare, "ratio_step": step / bare, "load_avg_1m": os.getloadavg()[0]})
        print(json.dumps(rounds[-1]), flush=True)

    # Recovery: kill the worker at step K (after a registered checkpoint), time until training continues.
    kill_at = args.warmup + 4
    rec_cfg = build_train_config({"model": args.preset, "data_dir": str(data_dir)},
                                 [*overrides, f"steps={kill_at + 2}", f"checkpoint.every={kill_at - 2}",
                                  f"fault_injection=0@{kill_at}", "scaling.max_failures=1"])
    run_training(rec_cfg, tmp / "runs", "recovery")
    ray.shutdown()
    killed = json.loads((tmp / "runs" / "recovery" / f"fault_injection-rank0-step{kill_at}.json").read_text())
    resumed = [r for r in read_metrics(tmp / "runs" / "recovery" / "metrics.jsonl") if r["time"] > killed["time"]][0]

    result = {
        "benchmark": "trainer_overhead",
        "preset": args.preset, "model": to_dict(cfg.model), "seq_len": args.seq, "global_batch": args.batch,
        "micro_batch": args.micro_batch, "steps": args.steps, "steady_state_from_step": args.warmup + 1,
        "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "rounds": rounds,
        "ratio_wall": statistics.median(r["ratio_wall"] for r in rounds),
        "ratio_step": statistics.median(r["ratio_step"] for r in rounds), "goal": 0.9,
        "startup_s": statistics.median(startups), "startup_s_all": startups,
        "recovery": {"killed_at_step": kill_at, "resumed_step": resumed["step"],
                     "kill_to_next_step_start_s": resumed["time"] - resumed["step_time_s"] - killed["time"],
                     "kill_to_next_step_done_s": resumed["time"] - killed["time"]},
        "notes": "1 Ray Train worker, DeepSpeed engine fp32 on CPU (config zero_stage 1, which a single worker runs "
                 "as stage 0: nothing to partition), offline W&B; ratios are medians over rounds of "
                 "per-round ratios of median tokens/s; jobs_train_wall = tokens / median "
                 "gap between metrics rows (everything a step costs); jobs_train_step = the loop's own step timer "
                 "(data + forward/backward + optimizer). Recovery includes Ray's failure detection "
                 "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5), worker restart, DeepSpeed init and checkpoint load.",
    }
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

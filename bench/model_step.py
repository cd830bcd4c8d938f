"""Forward+backward tokens/s of our Aquila3 vs transformers' Qwen2 on the same config, batch and threads.

The two models hold identical weights (imported through aquila_ray.hf) and are timed alternately in one
run, so machine noise hits both; we report medians and their ratio (goal: ours >= 1.0x).

    python bench/model_step.py [--preset demo-small] [--batch 8] [--seq 256] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aquila_ray.checkpoint import save_model
from aquila_ray.config import get_preset, to_dict
from aquila_ray.hf import export_hf
from aquila_ray.model import build_model


def step_seconds(model: torch.nn.Module, x: torch.Tensor, ours: bool) -> float:
    t0 = time.perf_counter()
    if ours:
        loss = model(x, labels=x).loss
    else:
        loss = torch.nn.functional.cross_entropy(model(x).logits.float().flatten(0, 1), x.flatten())
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_step.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    ours = build_model(cfg, seed=0).train()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, Path(tmp) / "ckpt")
        export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf")
        theirs = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa").train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    for _ in range(2):  # warm-up
        step_seconds(ours, x, True)
        step_seconds(theirs, x, False)
    times: dict[str, list[float]] = {"aquila_ray": [], "transformers_qwen2": []}
    for _ in range(args.repeats):
        times["aquila_ray"].append(step_seconds(ours, x, True))
        times["transformers_qwen2"].append(step_seconds(theirs, x, False))
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "model_step",
        "preset": args.preset,
        "model": to_dict(cfg),
        "batch": args.batch,
        "seq_len": args.seq,
        "threads": args.threads,
        "repeats": args.repeats,
        "median_step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "speedup_ours_vs_transformers": med["transformers_qwen2"] / med["aquila_ray"],
        "goal": ">= 1.0",
        "torch": torch.__version__,
    }
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "speedup_ours_vs_transformers")}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Forward+backward time of an 8-expert top-2 MoE block vs a dense SwiGLU MLP with the same active
parameters (intermediate size k * F) on the same tokens, and vs a naive loop over experts (mask the
tokens of each expert, as HF Mixtral's eager path does). All three are timed alternately in one run so
machine noise hits each; we report medians and ratios (goal on CPU: MoE <= 1.5x dense).

    python bench/moe_step.py [--hidden 256] [--ffn 704] [--tokens 2048] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from aquila_ray.config import ModelConfig, MoEConfig
from aquila_ray.model.model import MLP
from aquila_ray.moe import MoELayer, route


class NaiveMoE(torch.nn.Module):
    """Same router and experts as ``MoELayer``, dispatched by a Python loop with boolean masks."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x = x_BTD.reshape(-1, x_BTD.shape[-1])
        r = route(self.layer.router(x), self.layer.moe)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.layer.experts.values()):
            tok, slot = (r.expert_idx_Nk == e).nonzero(as_tuple=True)
            if tok.numel():
                y = y.index_add(0, tok, expert(x[tok]) * r.weight_Nk[tok, slot, None])
        return y.view_as(x_BTD)


def step_seconds(fn: torch.nn.Module, x: torch.Tensor, moe: bool) -> float:
    t0 = time.perf_counter()
    y = fn(x)
    if moe and isinstance(y, tuple):
        out, stats = y
        loss = out.square().mean() + stats.aux_loss + stats.z_loss
    else:
        loss = y.square().mean()
    loss.backward()
    for p in fn.parameters():
        p.grad = None
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=704, help="expert intermediate size F")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=1,
                      num_heads=4, num_kv_heads=4, moe=MoEConfig(num_experts=args.experts, top_k=args.top_k))
    moe = MoELayer(cfg, 0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe.router.reset_router()
    naive = NaiveMoE(moe)
    dense = MLP(args.hidden, args.top_k * args.ffn)  # same active parameters per token (router aside)
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=False)
    with torch.no_grad():
        ref = moe(x)[0]
        assert torch.allclose(naive(x), ref, atol=1e-6), "naive loop disagrees with MoELayer"
    runs = {"moe_layer": (moe, True), "dense_same_active": (dense, False), "naive_expert_loop": (naive, True)}
    for _ in range(2):
        for fn, is_moe in runs.values():
            step_seconds(fn, x, is_moe)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, (fn, is_moe) in runs.items():
            times[name].append(step_seconds(fn, x, is_moe))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "moe_step",
        "what": "forward+backward of one MoE block vs a dense SwiGLU MLP of width k*F, same tokens",
        "hidden": args.hidden, "expert_ffn": args.ffn, "experts": args.experts, "top_k": args.top_k,
        "tokens": args.tokens, "threads": args.threads, "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "median_step_s": med,
        "ratio_moe_over_dense": med["moe_layer"] / med["dense_same_active"],
        "ratio_naive_over_moe": med["naive_expert_loop"] / med["moe_layer"],
        "goal": "moe_layer <= 1.5x dense_same_active",
    }
    result["goal_met"] = result["ratio_moe_over_dense"] <= 1.5
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

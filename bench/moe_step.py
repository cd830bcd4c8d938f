"""Forward+backward time of an 8-expert top-2 MoE block: our ``MoELayer`` vs DeepSpeed's MoE layer
(``deepspeed.moe.layer.MoE``) holding the same router and expert weights, vs a dense SwiGLU MLP with the
same active parameters (intermediate size k * F), and vs a naive loop over experts (mask the tokens of
each expert, as HF Mixtral's eager path does), all on the same tokens. The four are timed alternately in
one run so machine noise hits each; we report medians and ratios per shape.

DeepSpeed runs in a single-process gloo group, dropless (``drop_tokens=False``: each step's capacity is the
largest expert load) and without its default Gumbel sampling of the 2nd expert
(``top2_2nd_expert_sampling=False``), so it routes exactly as ours and its output is checked against ours.

Goals on CPU: ours >= 1.2x faster than DeepSpeed's MoE, >= 1.3x faster than the naive loop, and <= 1.1x
the dense MLP. Shapes are HIDDENxFFNxTOKENS; by default a matmul-bound (256x704x2048) and a dispatch-bound
(64x176x512) one. The JSON has one entry per shape under "shapes" and the first shape's goals at top level.

    python bench/moe_step.py [--sizes 256x704x2048 64x176x512] [--repeats 15] [--device cpu|cuda] [--out PATH]

On a GPU (``--device cuda``, bf16) our layer runs its grouped-GEMM path; give ``--out`` a new name there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.moe.layer import MoE

from aquila_ray.config import ModelConfig, MoEConfig
from aquila_ray.model import MLP, MoELayer
from aquila_ray.moe import route

GOALS: dict[str, tuple[str, float, str]] = {  # metric -> (comparison, bound, the goal in words), on CPU
    "speedup_vs_deepspeed_moe": (">=", 1.2, "ours >= 1.2x faster than DeepSpeed's MoE, forward+backward"),
    "ratio_naive_over_moe": (">=", 1.3, "ours >= 1.3x faster than the naive per-expert loop"),
    "ratio_moe_over_dense": ("<=", 1.1, "ours <= 1.1x the dense MLP of equal active parameters"),
}


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: hidden size D, expert width F, tokens N."""

    hidden: int
    ffn: int
    tokens: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"256x704x2048"`` -> Shape(256, 704, 2048)."""
        hidden, ffn, tokens = (int(v) for v in text.lower().split("x"))
        return cls(hidden, ffn, tokens)

    def __str__(self) -> str:
        return f"{self.hidden}x{self.ffn}x{self.tokens}"


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


def init_single_process_group() -> None:
    """A one-rank gloo world and DeepSpeed's comm backend on it (its MoE layer's expert groups need both)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")


def deepspeed_moe_like(layer: MoELayer) -> MoE:
    """DeepSpeed's top-2 dropless MoE with ``layer``'s router and expert weights."""
    D, F = layer.hidden_size, layer.expert_size
    ds = MoE(hidden_size=D, expert=MLP(D, F), num_experts=layer.num_experts, ep_size=1, k=layer.moe.top_k,
             drop_tokens=False, top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()  # registers (or reuses) the "ep_size_1" expert groups
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight)
        for ds_expert, expert in zip(ds.deepspeed_moe.experts.deepspeed_experts, layer.experts.values(), strict=True):
            ds_expert.load_state_dict(expert.state_dict())
    return ds


def ours_loss(y: Any) -> torch.Tensor:
    out, stats = y
    return out.square().mean() + stats.aux_loss + stats.z_loss


def deepspeed_loss(y: Any) -> torch.Tensor:
    out, l_aux, _exp_counts = y
    return out.square().mean() + l_aux


def plain_loss(y: Any) -> torch.Tensor:
    """For the modules that return just their output (dense MLP, naive loop)."""
    return y.square().mean()


def step_seconds(fn: torch.nn.Module, loss_of: Callable[[Any], torch.Tensor], x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss_of(fn(x)).backward()
    for p in fn.parameters():
        p.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(shape: Shape, experts: int, top_k: int, repeats: int, device: str) -> dict[str, Any]:
    """Median step times of the four variants on one shape, their ratios and the goals. On CUDA everything
    runs in bf16 (our layer then takes its grouped-GEMM path)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_layers=1,
                      num_heads=4, num_kv_heads=4, moe=MoEConfig(num_experts=experts, top_k=top_k))
    moe = MoELayer(cfg, 0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe.router.reset_router()
    naive = NaiveMoE(moe)
    ds_moe = deepspeed_moe_like(moe)
    dense = MLP(shape.hidden, top_k * shape.ffn)  # same active parameters per token (router aside)
    x = torch.randn(1, shape.tokens, shape.hidden)
    if device == "cuda":
        x = x.to(device, torch.bfloat16)
        for module in (moe, ds_moe, dense):
            module.to(device, torch.bfloat16)
    atol = 1e-6 if x.dtype == torch.float32 else 2e-2
    with torch.no_grad():
        ref = moe(x)[0]
        assert torch.allclose(naive(x), ref, atol=atol), "naive loop disagrees with MoELayer"
        assert torch.allclose(ds_moe(x)[0], ref, atol=atol), "DeepSpeed's MoE disagrees with MoELayer"
    deepspeed_loss(ds_moe(x)).backward()
    assert all(p.grad is not None for p in ds_moe.parameters()), "DeepSpeed MoE backward missed a parameter"
    ds_moe.zero_grad(set_to_none=True)
    runs: dict[str, tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]] = {
        "moe_layer": (moe, ours_loss), "deepspeed_moe": (ds_moe, deepspeed_loss),
        "dense_same_active": (dense, plain_loss), "naive_expert_loop": (naive, plain_loss)}
    for _ in range(2):
        for fn, loss_of in runs.values():
            step_seconds(fn, loss_of, x)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, (fn, loss_of) in runs.items():
            times[name].append(step_seconds(fn, loss_of, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "speedup_vs_deepspeed_moe": med["deepspeed_moe"] / med["moe_layer"],
        "ratio_naive_over_moe": med["naive_expert_loop"] / med["moe_layer"],
        "ratio_moe_over_dense": med["moe_layer"] / med["dense_same_active"],
    }
    # what the two speed ratios would be if our layer ran as fast as the dense MLP of equal active parameters:
    # the same fp32 FLOPs in 3 large GEMMs, which no per-expert (or grouped) split is expected to beat on the
    # same BLAS; a goal above this cannot be met at this shape by dispatch work alone
    at_dense_speed = {"speedup_vs_deepspeed_moe": med["deepspeed_moe"] / med["dense_same_active"],
                      "ratio_naive_over_moe": med["naive_expert_loop"] / med["dense_same_active"]}
    goals = {k: {"goal": text, "target": f"{k} {op} {bound}",
                 "goal_met": ratios[k] >= bound if op == ">=" else ratios[k] <= bound}
             for k, (op, bound, text) in GOALS.items()}
    return {"hidden": shape.hidden, "expert_ffn": shape.ffn, "tokens": shape.tokens, "median_step_s": med,
            **ratios, "ratios_if_at_dense_speed": at_dense_speed, "goals": goals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=Shape.parse, default=[Shape(256, 704, 2048), Shape(64, 176, 512)],
                        metavar="DxFxN", help="hidden x expert ffn x tokens; the first gives the top-level goals")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16, grouped GEMMs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_single_process_group()
    try:
        shapes = {str(s): measure(s, args.experts, args.top_k, args.repeats, args.device) for s in args.sizes}
    finally:
        torch.distributed.destroy_process_group()
    first = shapes[str(args.sizes[0])]
    result = {
        "benchmark": "moe_step",
        "what": "forward+backward of one MoE block: ours vs DeepSpeed's MoE (same weights) vs a dense SwiGLU MLP "
                "of width k*F vs a naive per-expert loop, same tokens",
        "deepspeed": {"version": deepspeed.__version__, "drop_tokens": False, "top2_2nd_expert_sampling": False,
                      "note": "dropless: capacity = max expert load per step (sharded_moe.top2gating); no Gumbel "
                              "sampling of the 2nd expert, so it routes as ours (outputs equal within 1e-6); "
                              "loss = out.square().mean() + l_aux"},
        "experts": args.experts, "top_k": args.top_k, "threads": args.threads, "repeats": args.repeats,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "goals_from_shape": str(args.sizes[0]),
        **{k: first[k] for k in GOALS},
        "ratios_if_at_dense_speed": first["ratios_if_at_dense_speed"],
        "goals": first["goals"],
        "goal_met": all(g["goal_met"] for g in first["goals"].values()),
        "shapes": shapes,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Offline upcycling of a checkpoint directory: dense checkpoint in, MoE checkpoint + ``upcycle_report.json``
out (the Scale-Out step between EfficientScale's stage 2 and stage 3, arXiv 2408.06567).

The report records what ran (experts, top-k, granularity, router order and init std, weight scale,
seed), the parameter counts, and the measured logit difference between the dense and the upcycled model
on a seeded probe batch: ~1e-7 in fp32 whenever ``exactly_preserving`` says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from aquila_ray.checkpoint import load_state_dict, save_checkpoint
from aquila_ray.config import ModelConfig, to_dict
from aquila_ray.model import Aquila3
from aquila_ray.upcycle.upcycle import (
    DEFAULT_OPTIONS,
    UpcycleOptions,
    exactly_preserving,
    upcycle_state_dict,
    weight_scale,
)

REPORT_NAME = "upcycle_report.json"


def _model(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> Aquila3:
    with torch.device("meta"):
        model = Aquila3(cfg)
    model.load_state_dict(sd, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.float().eval()


def probe_logit_difference(dense_sd: dict[str, torch.Tensor], src: ModelConfig, moe_sd: dict[str, torch.Tensor],
                           dst: ModelConfig, batch: int = 2, seq_len: int = 32, seed: int = 0) -> dict[str, Any]:
    """Max and mean |logit difference| (fp32) between the dense and MoE models on random probe tokens."""
    seq_len = min(seq_len, src.max_seq_len)
    tokens = torch.randint(0, src.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        dense = _model(src, dense_sd)(tokens).logits
        out = _model(dst, moe_sd)(tokens)
    diff = (dense - out.logits).abs()
    dropped = int(sum(int(s.dropped_tokens) for s in out.router_stats))
    return {"tokens": [batch, seq_len], "seed": seed, "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(), "max_abs_dense_logit": dense.abs().max().item(),
            "dropped_assignments": dropped}


def method(dst: ModelConfig) -> str:
    """What the upcycling does, in words, for reports and plans."""
    assert dst.moe is not None
    words = ("virtual-group granular upcycling (arXiv 2410.07524)" if dst.moe.granularity > 1
             else "sparse upcycling: experts are copies of the dense MLP (arXiv 2212.05055)")
    if dst.moe.drop_upcycling_ratio > 0:
        words += (f", then Drop-Upcycling (arXiv 2502.19261): {dst.moe.drop_upcycling_ratio:g} of each expert's "
                  f"intermediate units re-initialized")
    return words


def upcycle_checkpoint(src_dir: str | Path, dst_dir: str | Path, dst: ModelConfig,
                       options: UpcycleOptions = DEFAULT_OPTIONS, probe: bool = True) -> dict[str, Any]:
    """Write the MoE checkpoint at ``dst_dir`` (atomically, report inside); return the report."""
    t0 = time.time()
    dense_sd, src = load_state_dict(src_dir)
    moe_sd = upcycle_state_dict(dense_sd, src, dst, options)
    assert dst.moe is not None  # upcycle_state_dict checked it
    report: dict[str, Any] = {
        "source": str(src_dir),
        "destination": str(dst_dir),
        "method": method(dst),
        "moe": to_dict(dst.moe),
        "router_init": f"N(0, std={dst.moe.router_init_std}) per virtual group of {dst.moe.granularity}",
        "seed": options.seed,
        "weight_scale": weight_scale(dst, options),
        "exactly_preserving_expected": exactly_preserving(dst, options),
        "parameters": {"dense": src.num_params(), "moe_total": dst.num_params(),
                       "moe_active": dst.num_params(active=True)},
    }
    if probe:
        report["probe"] = probe_logit_difference(dense_sd, src, moe_sd, dst, seed=options.seed)
    report["seconds"] = round(time.time() - t0, 3)
    save_checkpoint(dst_dir, moe_sd, dst, extra_files={REPORT_NAME: json.dumps(report, indent=2)})
    return report


__all__ = ["REPORT_NAME", "method", "probe_logit_difference", "upcycle_checkpoint"]

"""Back-of-the-envelope plans for a training stage: parameters, FLOPs, tokens and memory per GPU.

Memory follows the ZeRO paper's accounting for mixed-precision Adam (Rajbhandari et al., 2020): 2 bytes
of bf16 weights, 2 of bf16 gradients and 12 of fp32 master weights + Adam moments per parameter, the
last 12 partitioned over the data-parallel group by ZeRO-1, gradients too by ZeRO-2, everything by ZeRO-3.
Expert parameters are split over the expert-parallel group and partitioned over the expert-data-parallel
group (world / EP). Activations use Megatron's per-layer estimate (Korthikanti et al., 2022) with flash
attention (34 * s * b * h bytes per layer) or full recomputation (2 * s * b * h).
"""

from __future__ import annotations

from typing import Any

from aquila_ray.config import ModelConfig
from aquila_ray.errors import ConfigError

GiB = 1024**3


def memory_per_gpu(cfg: ModelConfig, world_size: int, zero_stage: int = 1, expert_parallel: int = 1,
                   micro_batch: int = 1, seq_len: int | None = None, recompute: bool = True) -> dict[str, float]:
    """Bytes per GPU (reported in GiB) for weights, gradients, optimizer states and activations."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage={zero_stage} is not valid; choose 0, 1, 2 or 3")
    if world_size % expert_parallel:
        raise ConfigError(f"expert_parallel={expert_parallel} must divide world_size={world_size}")
    if cfg.moe is not None and cfg.moe.num_experts % expert_parallel:
        raise ConfigError(f"expert_parallel={expert_parallel} must divide num_experts={cfg.moe.num_experts}")
    total = cfg.num_params()
    expert = 0 if cfg.moe is None else cfg.num_layers * (cfg.mlp_params() - cfg.hidden_size * cfg.moe.num_experts)
    dense = total - expert
    # per-GPU parameter counts, and the data-parallel degree each kind is partitioned over
    groups = [(dense, world_size), (expert / expert_parallel, world_size // expert_parallel)]
    weights = grads = states = 0.0
    for n, dp in groups:
        weights += 2 * n / (dp if zero_stage >= 3 else 1)
        grads += 2 * n / (dp if zero_stage >= 2 else 1)
        states += 12 * n / (dp if zero_stage >= 1 else 1)
    s = seq_len or cfg.max_seq_len
    per_layer = (2 if recompute else 34) * s * micro_batch * cfg.hidden_size
    activations = cfg.num_layers * per_layer + 4 * s * micro_batch * cfg.vocab_size  # + fp32 logits
    out = {"weights": weights, "gradients": grads, "optimizer_states": states, "activations": activations}
    out["total"] = sum(out.values())
    return {k: v / GiB for k, v in out.items()}


def stage_plan(cfg: ModelConfig, tokens: float, world_size: int, zero_stage: int = 1, expert_parallel: int = 1,
               micro_batch: int = 1, seq_len: int | None = None) -> dict[str, Any]:
    """What a stage costs: parameters, FLOPs per token and in total, memory per GPU."""
    s = seq_len or cfg.max_seq_len
    fpt = cfg.flops_per_token(s)
    return {
        "model": cfg.describe(),
        "parameters": cfg.num_params(),
        "active_parameters": cfg.num_params(active=True),
        "flops_per_token": fpt,
        "tokens": tokens,
        "total_flops": fpt * tokens,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "expert_parallel": expert_parallel,
        "memory_per_gpu_gib": {k: round(v, 2) for k, v in memory_per_gpu(
            cfg, world_size, zero_stage, expert_parallel, micro_batch, s).items()},
    }

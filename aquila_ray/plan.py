"""Back-of-the-envelope plans for a training stage: parameters, FLOPs, tokens and memory per GPU.

Memory follows the ZeRO paper's accounting for mixed-precision Adam (Rajbhandari et al., 2020): 2 bytes
of bf16 weights, 2 of bf16 gradients (+ 4 for the fp32 buffer the trainer accumulates them in) and 12 of
fp32 master weights + Adam moments per parameter, the last 12 partitioned over the data-parallel group by
ZeRO-1, gradients too by ZeRO-2, everything by ZeRO-3.
Expert parameters are split over the expert-parallel group and partitioned over the expert-data-parallel
group (world / EP). Activations are counted from what autograd keeps for *this* model's forward
(``activation_bytes``; the tensors each op saves, checked against ``torch.autograd.graph.saved_tensors_hooks``
on CPU by tests/test_model.py) under the trainer's ``activation_checkpointing`` setting.

Wall-clock, checkpoint and host-memory figures rest on ``PlanAssumptions`` (MFU, peak FLOP/s, storage
bandwidth, host memory per worker), which every plan prints next to them. ``cluster_fit`` checks a plan
against a Ray cluster launcher config (cluster.yaml): GPUs, GPU memory and host memory per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aquila_ray.config import ModelConfig
from aquila_ray.errors import ConfigError

GiB = 1024**3

GPU_MEMORY_GIB = {"p5.48xlarge": 80, "p5e.48xlarge": 141, "p5en.48xlarge": 141, "p4de.24xlarge": 80,
                  "p4d.24xlarge": 40, "p6-b200.48xlarge": 179}
"""Memory of one GPU of each AWS 8-GPU instance type (H100, H200, A100 80/40 GB, B200), for ``cluster_fit``."""


@dataclass(frozen=True)
class PlanAssumptions:
    """What a plan's wall-clock, checkpoint and host-memory figures assume; printed with every plan."""

    mfu: float = 0.40
    """Model FLOPs utilization the training runs at (Megatron-class dense/MoE training on H100: 0.35-0.5)."""
    peak_flops_per_gpu: float = 989e12
    """bf16 dense peak of one GPU (H100/H200 SXM)."""
    storage_gb_per_s_per_node: float = 2.5
    """Bytes per second one node sustains writing a checkpoint to the storage path (S3: ~20 Gbit/s)."""
    gpus_per_node: int = 8
    """Training workers (one GPU each) per node."""
    host_gib_per_worker: float = 8.0
    """Host memory of one GPU worker process beyond checkpoint staging: torch, CUDA and NCCL, Ray, the
    memory-mapped token shards it reads."""
    save_staging_bytes: int = 64 * 2**20
    """What a checkpoint save holds on the host per worker (``checkpointing.STAGING_BYTES``: the state is
    streamed from the device to the file in pieces of this size)."""
    gpu_memory_headroom: float = 0.90
    """Share of a GPU's memory a plan may fill (the rest: CUDA context, NCCL buffers, fragmentation)."""


def _per_token_layer_bytes(cfg: ModelConfig, a: int) -> dict[str, float]:
    """Bytes autograd keeps per token in one block, by part, with ``a`` bytes per activation element (2 for
    bf16, 4 for fp32). RMSNorm works in fp32: its input's fp32 copy (4h; the input itself when fp32), the
    1/rms (4), the normalized tensor and the norm's output (a*h each). Attention (SDPA, flash or CPU):
    rotated q, k and v, the output, the fp32 log-sum-exp per head. SwiGLU: gate, silu(gate), up and their
    product (4 a f). MoE: fp32 router logits and probabilities (8E), routing indices, weights and the sort
    order (32k), the sorted input and two h-wide outputs per assignment (3 a h k), the experts' SwiGLU
    (4 a f_e k), and the router's fp32 copy of its input under bf16 (4h)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    norm = 4 * h + 4 + 2 * a * h
    attention = a * (2 * cfg.num_heads * hd + 2 * cfg.num_kv_heads * hd) + 4 * cfg.num_heads
    if cfg.moe is None:
        mlp = 4 * a * cfg.intermediate_size
    else:
        k, e = cfg.moe.top_k, cfg.moe.num_experts
        mlp = a * k * (3 * h + 4 * cfg.expert_intermediate_size) + 8 * e + 32 * k + 4 + (4 * h if a != 4 else 0)
    return {"attention_half": norm + attention, "mlp_half": norm + mlp}


def activation_bytes(cfg: ModelConfig, tokens: int, mode: str = "none", bytes_per_element: int = 2
                     ) -> dict[str, float]:
    """Activation memory of one micro-batch of ``tokens`` (= micro_batch * seq_len) under the trainer's
    ``activation_checkpointing`` ``mode``: ``stored`` is what the forward keeps until backward, ``recompute``
    what one block's recomputation adds at its peak in backward. none: every block's activations; full:
    each block's input (a h); selective: the attention half plus the MLP half's input (a h), recomputing
    the MLP half. The head (final norm, fp32 log-softmax over the vocabulary, ids and labels) is kept always."""
    if mode not in ("none", "full", "selective"):
        raise ConfigError(f"activation_checkpointing={mode!r} is not valid; choose none, full or selective")
    a = bytes_per_element
    part = _per_token_layer_bytes(cfg, a)
    block = part["attention_half"] + part["mlp_half"]
    hidden = a * cfg.hidden_size
    per_layer, recompute = {"none": (block, 0.0), "full": (hidden, block),
                            "selective": (part["attention_half"] + hidden, part["mlp_half"])}[mode]
    head = 4 * cfg.hidden_size + 4 + 2 * a * cfg.hidden_size + 4 * cfg.vocab_size + 16
    return {"stored": tokens * (cfg.num_layers * per_layer + head), "recompute": tokens * recompute}


def memory_per_gpu(cfg: ModelConfig, world_size: int, zero_stage: int = 1, expert_parallel: int = 1,
                   micro_batch: int = 1, seq_len: int | None = None, activation_checkpointing: str = "none",
                   bytes_per_element: int = 2) -> dict[str, float]:
    """Bytes per GPU (reported in GiB) for weights, gradients, optimizer states and activations (with the
    activation checkpointing the trainer runs)."""
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
        # bf16 gradients plus the fp32 buffer they are accumulated in over micro-steps (grad_accum_dtype)
        grads += (2 + 4) * n / (dp if zero_stage >= 2 else 1)
        states += 12 * n / (dp if zero_stage >= 1 else 1)
    s = seq_len or cfg.max_seq_len
    act = activation_bytes(cfg, micro_batch * s, activation_checkpointing, bytes_per_element)
    out = {"weights": weights, "gradients": grads, "optimizer_states": states,
           "activations": act["stored"] + act["recompute"]}
    out["total"] = sum(out.values())
    return {k: v / GiB for k, v in out.items()}


def stage_plan(cfg: ModelConfig, tokens: float, world_size: int, zero_stage: int = 1, expert_parallel: int = 1,
               micro_batch: int = 1, seq_len: int | None = None, activation_checkpointing: str = "none",
               assumptions: PlanAssumptions = PlanAssumptions()) -> dict[str, Any]:
    """What a stage costs: parameters, FLOPs per token and in total, memory per GPU, checkpoint size and save
    time, host memory per node and wall-clock (the last three under ``assumptions``)."""
    s = seq_len or cfg.max_seq_len
    fpt = cfg.flops_per_token(s)
    a = assumptions
    params = cfg.num_params()
    nodes = math.ceil(world_size / a.gpus_per_node)
    # rank 0 streams the export one fp32 tensor at a time; an expert tensor arrives from every EP rank
    expert_tensor = 0 if cfg.moe is None else expert_parallel * cfg.expert_intermediate_size * cfg.hidden_size
    largest = 4 * max(cfg.vocab_size * cfg.hidden_size, cfg.intermediate_size * cfg.hidden_size, expert_tensor)
    state = 12 * params  # fp32 master weights and both Adam moments, each rank writing its partition
    host = min(world_size, a.gpus_per_node) * (a.host_gib_per_worker * GiB + a.save_staging_bytes) + largest
    total_flops = fpt * tokens
    return {
        "model": cfg.describe(),
        "parameters": params,
        "active_parameters": cfg.num_params(active=True),
        "flops_per_token": fpt,
        "tokens": tokens,
        "total_flops": total_flops,
        "world_size": world_size,
        "nodes": nodes,
        "zero_stage": zero_stage,
        "expert_parallel": expert_parallel,
        "activation_checkpointing": activation_checkpointing,
        "memory_per_gpu_gib": {k: round(v, 2) for k, v in memory_per_gpu(
            cfg, world_size, zero_stage, expert_parallel, micro_batch, s, activation_checkpointing).items()},
        "host_memory_per_node_gib": round(host / GiB, 1),
        "checkpoint": {
            "training_state_gib": round(state / GiB, 1),
            "per_node_gib": round(state / nodes / GiB, 1),
            "save_seconds": round(state / nodes / (a.storage_gb_per_s_per_node * 1e9), 1),
            "model_export_gib": round(4 * params / GiB, 1),
            "export_seconds": round(4 * params / (a.storage_gb_per_s_per_node * 1e9), 1),
        },
        "wall_clock_days": round(total_flops / (world_size * a.peak_flops_per_gpu * a.mfu) / 86400, 2),
    }


def cluster_fit(cluster: dict[str, Any], stages: dict[str, dict[str, Any]],
                assumptions: PlanAssumptions = PlanAssumptions()) -> dict[str, dict[str, Any]]:
    """Per stage (a ``stage_plan`` with ``world_size``), whether a Ray cluster launcher config can run it:
    a GPU node type with enough nodes (``max_workers`` x GPUs >= workers, within the cluster's own
    ``max_workers``), GPU memory (``GPU_MEMORY_GIB`` of its InstanceType, times the headroom) >= the plan's
    memory per GPU, and host memory (its ``memory`` resource) >= the plan's per node. ``fits`` is True when
    one GPU node type satisfies all three; ``problems`` says what each type lacks."""
    types = {name: t for name, t in cluster.get("available_node_types", {}).items()
             if t.get("resources", {}).get("GPU", 0) > 0}
    out: dict[str, dict[str, Any]] = {}
    for stage, plan in stages.items():
        problems: list[str] = []
        fits_on: list[str] = []
        for name, t in types.items():
            res, instance = t["resources"], t.get("node_config", {}).get("InstanceType", "?")
            gpus = int(res["GPU"])
            nodes = math.ceil(plan["world_size"] / gpus)
            max_nodes = min(int(t.get("max_workers", 0)), int(cluster.get("max_workers", t.get("max_workers", 0))))
            gpu_mem = GPU_MEMORY_GIB.get(instance)
            need_gpu, need_host = plan["memory_per_gpu_gib"]["total"], plan["host_memory_per_node_gib"]
            mine = []
            if nodes > max_nodes:
                mine.append(f"{name}: needs {nodes} nodes of {gpus} GPUs for {plan['world_size']} workers, "
                            f"max_workers allows {max_nodes}")
            if gpu_mem is None:
                mine.append(f"{name}: GPU memory of InstanceType {instance!r} unknown (known: "
                            f"{sorted(GPU_MEMORY_GIB)})")
            elif need_gpu > assumptions.gpu_memory_headroom * gpu_mem:
                mine.append(f"{name}: plans {need_gpu} GiB per GPU, {instance} has {gpu_mem} GiB "
                            f"({assumptions.gpu_memory_headroom:.0%} usable)")
            host = res.get("memory", 0) / GiB
            if need_host > host:
                mine.append(f"{name}: plans {need_host} GiB host memory per node, its memory resource is "
                            f"{host:.0f} GiB")
            problems += mine
            if not mine:
                fits_on.append(name)
        if not types:
            problems.append("the cluster has no node type with GPUs")
        out[stage] = {"fits": bool(fits_on), "node_types": fits_on, "problems": [] if fits_on else problems}
    return out


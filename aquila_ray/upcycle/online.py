"""Online upcycling (NVIDIA arXiv 2412.09952): each expert-parallel rank builds its MoE model straight from
the dense checkpoint, reading the dense tensors one at a time and materializing only its local experts.
No MoE checkpoint is written and no process ever holds all experts.

The trainer calls, on every rank, after creating the expert-parallel groups::

    ep = ExpertParallel(size=ep_size, rank=ep_rank, group=ep_group)
    model = build_upcycled_model(dense_dir, moe_cfg, ep, UpcycleOptions(seed=seed))

The weights equal the offline transform's (``upcycle_state_dict``) for the same experts: both run
``upcycle_tensors``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from aquila_ray.checkpoint import CheckpointReader
from aquila_ray.config import ModelConfig
from aquila_ray.model import Aquila3
from aquila_ray.moe.dispatcher import SINGLE_DEVICE, ExpertParallel, use_expert_parallel
from aquila_ray.upcycle.upcycle import DEFAULT_OPTIONS, UpcycleOptions, check_compatible, upcycle_tensors


def build_upcycled_model(dense_ckpt_dir: str | Path, dst: ModelConfig, ep: ExpertParallel = SINGLE_DEVICE,
                         options: UpcycleOptions = DEFAULT_OPTIONS, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None) -> Aquila3:
    """An MoE Aquila3 holding experts ``ep.local_experts(E)`` (and everything else), upcycled from the
    dense checkpoint; in train mode, on ``device``, in the checkpoint's dtype unless ``dtype`` is given."""
    reader = CheckpointReader(dense_ckpt_dir)
    src = reader.config
    check_compatible(src, dst)
    assert dst.moe is not None  # checked above
    local = tuple(ep.local_experts(dst.moe.num_experts))
    opts = dataclasses.replace(options, experts=local)
    with torch.device("meta"), use_expert_parallel(ep):
        model = Aquila3(dst)
    sd = {k: v.to(device=device, dtype=dtype) if dtype else v.to(device)
          for k, v in upcycle_tensors(reader.get, reader.keys(), src, dst, opts)}
    model.load_state_dict(sd, strict=not dst.tie_embeddings, assign=True)
    if dst.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.train()


__all__ = ["build_upcycled_model"]

"""The weight transforms between EfficientScale's training stages as Ray tasks (AquilaMoE, arXiv 2408.06567).

``scale_up_task`` grows a checkpoint (``aquila_ray.growth.grow_checkpoint``: FPI, AKI or AKI-Pro) and returns
its report. It is a plain function, usable directly; ``scale_up_remote`` wraps it as a Ray task that asks
for ``num_cpus`` and ``memory`` so that on a cluster it lands on a node with enough memory, and
``run_scale_up`` runs it on the current Ray cluster (or starts one, or runs in-process with ``local``).
Ray is imported only inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aquila_ray.checkpoint import load_config
from aquila_ray.config import ModelConfig
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.growth import grow_checkpoint, make_plan
from aquila_ray.growth.checkpoint import memory_estimate_bytes

DEFAULT_SHARD_BYTES = 2 * 1024**3


def scale_up_task(src: str | Path, dst: str | Path, growth_cfg: GrowthConfig, target_cfg: ModelConfig,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """Grow the checkpoint ``src`` into ``target_cfg``'s shape at ``dst``; returns growth_report.json's dict."""
    return grow_checkpoint(src, dst, target_cfg, growth_cfg, max_shard_bytes=max_shard_bytes)


def scale_up_remote(num_cpus: float = 1.0, memory: int | None = None) -> Any:
    """``scale_up_task`` as a Ray remote function with these resources (``memory`` in bytes)."""
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": 0}
    if memory is not None:
        options["memory"] = int(memory)
    return ray.remote(scale_up_task).options(**options)


def scale_up_memory(src: str | Path, growth_cfg: GrowthConfig, target_cfg: ModelConfig,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """The memory (bytes) to reserve for growing ``src``: ``memory_estimate_bytes`` of its plan."""
    plan = make_plan(load_config(src), target_cfg, growth_cfg)
    return memory_estimate_bytes(plan, 4, max_shard_bytes)


def run_scale_up(src: str | Path, dst: str | Path, growth_cfg: GrowthConfig, target_cfg: ModelConfig, *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, local: bool = False, num_cpus: float = 1.0,
                 memory: int | None = None) -> dict[str, Any]:
    """Run the growth as a Ray task on the connected cluster (``ray.init()`` if none), or in-process.

    ``memory`` None reserves ``scale_up_memory``. Config errors surface here, before any task is scheduled.
    """
    if memory is None:
        memory = scale_up_memory(src, growth_cfg, target_cfg, max_shard_bytes)  # also validates the growth
    if local:
        return scale_up_task(src, dst, growth_cfg, target_cfg, max_shard_bytes)
    import ray

    if not ray.is_initialized():
        ray.init()
    ref = scale_up_remote(num_cpus, memory).remote(str(src), str(dst), growth_cfg, target_cfg, max_shard_bytes)
    return dict(ray.get(ref))

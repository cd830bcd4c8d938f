"""The weight transforms between EfficientScale's training stages as Ray tasks (AquilaMoE, arXiv 2408.06567).

``run_task`` runs any function as a Ray task that asks for ``num_cpus`` and ``memory`` so that on a cluster it
lands on a node with enough memory (or in-process with ``local``). ``run_scale_up`` grows a checkpoint
(``aquila_ray.growth.grow_checkpoint``: FPI, AKI or AKI-Pro), ``run_scale_out`` upcycles one
(``aquila_ray.upcycle.upcycle_checkpoint``); both return the transform's report. Ray is imported only
inside ``run_task``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aquila_ray.checkpoint import load_config
from aquila_ray.checkpoint.io import DEFAULT_SHARD_BYTES
from aquila_ray.config import ModelConfig
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.growth import grow_checkpoint, make_plan
from aquila_ray.growth.checkpoint import memory_estimate_bytes
from aquila_ray.upcycle import UpcycleOptions, check_compatible, upcycle_checkpoint

T = TypeVar("T")

TRANSFORM_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
"""Environment of the weight-transform processes. PyTorch's CPU allocator backs tensors of 2 MB and more with
transparent huge pages: a transform touches every byte of freshly allocated output once, and 4 KiB page faults
were about a third of its time (a profiled growth of bench/grow.py's model: 7.1 s -> 4.8 s). PyTorch reads the
variable once, at its first allocation, so it is set when the process starts: in the Ray task's runtime_env, in
bench/grow.py's child, and by ``use_transform_env`` at the start of the jobs that may transform in-process
(``--local``)."""


def use_transform_env() -> None:
    """Fill in ``TRANSFORM_ENV`` for this process where the variables are unset (a user's
    ``THP_MEM_ALLOC_ENABLE=0`` stands). Effective only before the process allocates its first tensor:
    call it first thing in a job's main."""
    for key, value in TRANSFORM_ENV.items():
        os.environ.setdefault(key, value)


def run_task(fn: Callable[..., T], *args: Any, local: bool = False, num_cpus: float = 1.0,
             memory: int | None = None, env: dict[str, str] | None = None) -> T:
    """``fn(*args)`` as a Ray task asking for ``num_cpus`` and ``memory`` bytes (so a cluster places it on a
    node that has them), on the connected cluster (``ray.init()`` if none); in this process with ``local``.
    ``env`` goes into the task's runtime_env (a worker process started with it; with ``local`` this process
    runs ``fn`` as it is: see ``use_transform_env``). A task is not retried: the transforms write atomically,
    and a failure should reach the user."""
    if local:
        return fn(*args)
    import ray  # deferred: only a non-local task needs Ray; the --local transforms run without importing it

    if not ray.is_initialized():
        ray.init()
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": 0}
    if memory is not None:
        options["memory"] = int(memory)
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return ray.get(ray.remote(fn).options(**options).remote(*args))


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
    return dict(run_task(grow_checkpoint, str(src), str(dst), target_cfg, growth_cfg, max_shard_bytes, local=local,
                         num_cpus=num_cpus, memory=memory, env=TRANSFORM_ENV))


def run_scale_out(src: str | Path, dst: str | Path, moe_cfg: ModelConfig, options: UpcycleOptions | None = None,
                  *, probe: bool = True, local: bool = False, num_cpus: float = 1.0) -> dict[str, Any]:
    """Upcycle the dense checkpoint ``src`` into ``moe_cfg`` at ``dst`` as a Ray task (or in-process with
    ``local``); returns upcycle_report.json's dict. The task reserves the dense and the MoE weights in fp32."""
    dense = load_config(src)
    check_compatible(dense, moe_cfg)  # before any task is scheduled
    memory = 4 * (dense.num_params() + moe_cfg.num_params())
    return dict(run_task(upcycle_checkpoint, str(src), str(dst), moe_cfg, options or UpcycleOptions(), probe,
                         local=local, num_cpus=num_cpus, memory=memory, env=TRANSFORM_ENV))

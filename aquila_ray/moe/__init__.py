"""Mixture of Experts: fp32 top-k router with load-balancing and z losses, and a token dispatcher with
expert parallelism (all-to-all over the expert-parallel group). The layer that combines them with SwiGLU
experts, ``MoELayer``, is part of the decoder (``aquila_ray.model``, which imports this package; nothing
here imports the model).

- ``Router``, ``route``, ``load_balancing_loss``, ``router_z_loss``: routing and the losses.
- ``ExpertParallel``, ``use_expert_parallel``, ``dispatch_combine``: placement and token exchange.
- The distributed side (process groups, DeepSpeed registration and optimizer groups, expert-gradient
  reduction, gathering expert tensors) lives with the trainer, in ``aquila_ray.train.parallelize``.

Papers: Sparse Upcycling (arXiv 2212.05055), AquilaMoE (2408.06567), ST-MoE (2202.08906),
NVIDIA 2412.09952 (online upcycling, EP8) and 2410.07524 (router order, granular upcycling).
"""

from aquila_ray.moe.dispatcher import (
    SINGLE_DEVICE,
    Dispatched,
    ExpertParallel,
    all_to_all,
    capacity,
    current_expert_parallel,
    dispatch_combine,
    use_expert_parallel,
)
from aquila_ray.moe.router import Router, Routing, load_balancing_loss, route, router_z_loss

__all__ = [
    "Dispatched",
    "ExpertParallel",
    "Router",
    "SINGLE_DEVICE",
    "Routing",
    "all_to_all",
    "capacity",
    "current_expert_parallel",
    "dispatch_combine",
    "load_balancing_loss",
    "route",
    "router_z_loss",
    "use_expert_parallel",
]

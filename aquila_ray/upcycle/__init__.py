"""Scale-Out: dense -> Mixture of Experts by sparse upcycling, offline and online.

- ``upcycle_state_dict(sd, src_cfg, dst_cfg, options)``: the pure transform (all experts or a subset).
- ``upcycle_checkpoint(src_dir, dst_dir, dst_cfg, options)``: checkpoint in, MoE checkpoint and
  ``upcycle_report.json`` (measured logit difference on a probe batch) out.
- ``build_upcycled_model(dense_dir, dst_cfg, ep, options)``: online, on one expert-parallel rank.
- ``moe_config(dense_cfg, num_experts, top_k, granularity, ...)``: the target config
  (``upcycled_config(dense_cfg, moe)`` from a whole MoEConfig).

Papers: Sparse Upcycling (Komatsuzaki et al., arXiv 2212.05055), AquilaMoE (2408.06567), NVIDIA
2412.09952 (online upcycling) and 2410.07524 (virtual-group granular upcycling, weight scaling),
Drop-Upcycling (Nakamura et al., arXiv 2502.19261: partial re-initialization of the expert copies).
"""

from aquila_ray.upcycle.offline import REPORT_NAME, method, probe_logit_difference, upcycle_checkpoint
from aquila_ray.upcycle.online import build_upcycled_model
from aquila_ray.upcycle.upcycle import (
    UpcycleOptions,
    check_compatible,
    dropped_units,
    exactly_preserving,
    expert_slice,
    moe_config,
    renormalized,
    router_weight,
    upcycle_state_dict,
    upcycle_tensors,
    upcycled_config,
    weight_scale,
)

__all__ = [
    "REPORT_NAME",
    "UpcycleOptions",
    "build_upcycled_model",
    "check_compatible",
    "dropped_units",
    "exactly_preserving",
    "expert_slice",
    "method",
    "moe_config",
    "probe_logit_difference",
    "renormalized",
    "router_weight",
    "upcycle_checkpoint",
    "upcycle_state_dict",
    "upcycle_tensors",
    "upcycled_config",
    "weight_scale",
]

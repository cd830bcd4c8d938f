"""Scale-Up: grow a small dense model into a larger one (FPI, AKI, AKI-Pro) as pure state-dict transforms.

Papers: Net2Net (arXiv 1511.05641) and bert2BERT (ACL 2022) for FPI and AKI; Apollo (arXiv 2401.09192) for
depth by interpolation; AquilaMoE (arXiv 2408.06567) for AKI-Pro and GQA compatibility. The math is in
DESIGN.md "Scale-Up" and docs/growth.md. Nothing here imports ray (the Ray task is
``aquila_ray.pipeline.tasks.run_scale_up``).

    plan = make_plan(src_cfg, dst_cfg, GrowthConfig(method="fpi", depth_mode="identity"))
    grown = grow_state_dict(state_dict, src_cfg, dst_cfg, plan.options)   # weights of plan.dst
    report = grow_checkpoint("ckpt/small", "ckpt/large", dst_cfg, options)  # streaming, growth_report.json
"""

from aquila_ray.config.growth import GrowthConfig
from aquila_ray.growth.checkpoint import REPORT_NAME, function_preserving, grow_checkpoint
from aquila_ray.growth.plan import GrowthPlan, UnitMap, grown_config, layer_map, make_plan, validate_growth
from aquila_ray.growth.probe import Fp64RMSNorm, probe, probe_tokens, use_fp64_norms
from aquila_ray.growth.transform import grow_state_dict, target_keys, target_shapes, target_tensor

__all__ = [
    "REPORT_NAME",
    "Fp64RMSNorm",
    "GrowthConfig",
    "GrowthPlan",
    "UnitMap",
    "function_preserving",
    "grow_checkpoint",
    "grow_state_dict",
    "grown_config",
    "layer_map",
    "make_plan",
    "probe",
    "probe_tokens",
    "target_keys",
    "target_shapes",
    "target_tensor",
    "use_fp64_norms",
    "validate_growth",
]

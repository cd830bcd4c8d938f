"""The Aquila3 decoder, dense or MoE (single-device, pure PyTorch)."""

from aquila_ray.model.model import (
    MLP,
    Aquila3,
    Attention,
    Block,
    ModelOutput,
    MoELayer,
    RMSNorm,
    RouterStats,
    build_model,
)

__all__ = ["MLP", "Aquila3", "Attention", "Block", "ModelOutput", "MoELayer", "RMSNorm", "RouterStats", "build_model"]

"""The Aquila3 decoder (single-device, pure PyTorch)."""

from aquila_ray.model.model import (
    MLP,
    Aquila3,
    Attention,
    Block,
    ModelOutput,
    RMSNorm,
    RouterStats,
    build_model,
)

__all__ = ["MLP", "Aquila3", "Attention", "Block", "ModelOutput", "RMSNorm", "RouterStats", "build_model"]

"""aquila-ray: EfficientScale (Scale-Up by model growth, Scale-Out by sparse upcycling) on Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch


def load_model(path: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """Load any aquila-ray checkpoint directory (dense or MoE) as an ``Aquila3`` model in eval mode.

    ``dtype`` defaults to torch.float32.
    """
    # deferred: `import aquila_ray` (and so every aquila_ray.* import, config-only ones included) must not
    # load torch and the model code
    from aquila_ray.checkpoint import load_model as _load

    return _load(path, device=device, dtype=dtype)

"""Every Hugging Face architecture aquila-ray converts, in one explicit table.

Keyed by HF ``model_type`` (what ``config.json`` names). ``pick_architecture`` takes the first entry a model
fits, so the order matters only between architectures that could both fit: none can (QKV bias or not,
dense or MoE exclude each other), and each entry's ``fits`` says why it refuses.
"""

from __future__ import annotations

from aquila_ray.hf.architectures import LLAMA, QWEN2, HFArchitecture
from aquila_ray.hf.moe import MIXTRAL, QWEN2_MOE

ARCHITECTURES: dict[str, HFArchitecture] = {arch.model_type: arch for arch in (QWEN2, LLAMA, QWEN2_MOE, MIXTRAL)}

__all__ = ["ARCHITECTURES"]

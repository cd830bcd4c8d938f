"""Safetensors checkpoints: sharded, atomic, integrity-checked, layout-independent model weights.

A checkpoint directory (DESIGN.md "Checkpoint directory") holds ``config.json`` (every ModelConfig field),
``model.safetensors`` or ``model-XXXXX-of-YYYYY.safetensors`` and ``model.safetensors.index.json``. The
index is Hugging Face's (``weight_map``) plus, under ``metadata.files``, the byte size and BLAKE3 digest of every
shard, checked on load. Everything is written under a temporary sibling name and renamed into place, so a
half-written checkpoint is never seen under the final name. Weights are never pickled.
"""

from aquila_ray.checkpoint.io import (
    INDEX_NAME,
    CheckpointReader,
    CheckpointWriter,
    atomic_directory,
    load_config,
    load_model,
    load_state_dict,
    save_checkpoint,
    save_model,
)

__all__ = [
    "INDEX_NAME",
    "CheckpointReader",
    "CheckpointWriter",
    "atomic_directory",
    "load_config",
    "load_model",
    "load_state_dict",
    "save_checkpoint",
    "save_model",
]

"""Hugging Face interop: one declarative key map per architecture (``registry.ARCHITECTURES`` lists them);
export and import."""

from aquila_ray.hf.architectures import HFArchitecture
from aquila_ray.hf.convert import config_from_hf, export_hf, hf_config, import_hf, pick_architecture
from aquila_ray.hf.keymap import KeyMap
from aquila_ray.hf.registry import ARCHITECTURES

__all__ = ["ARCHITECTURES", "HFArchitecture", "KeyMap", "config_from_hf", "export_hf", "hf_config",
           "import_hf", "pick_architecture"]

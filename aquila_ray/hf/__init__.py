"""Hugging Face interop: one declarative key map per architecture; export and import."""

from aquila_ray.hf.architectures import ARCHITECTURES, HFArchitecture
from aquila_ray.hf.convert import config_from_hf, export_hf, hf_config, import_hf, pick_architecture
from aquila_ray.hf.keymap import KeyMap

__all__ = ["ARCHITECTURES", "HFArchitecture", "KeyMap", "config_from_hf", "export_hf", "hf_config",
           "import_hf", "pick_architecture"]

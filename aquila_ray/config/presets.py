"""The preset registry: every named model shape, in one dict (STYLE.md rule 2), and every named Scale-Out
setting (``MOE_PRESETS``: what ``--set scale_out.moe=NAME`` picks in a recipe).

``tiny*`` presets run in tests and on CPU; ``demo-*`` are CPU demonstration sizes; ``aquila3-*`` are the
seed's shapes (DESIGN.md table), checked on the meta device only.
"""

from __future__ import annotations

from collections.abc import Callable

from aquila_ray.config.base import from_registry
from aquila_ray.config.model import ModelConfig, MoEConfig


def aquilamoe() -> MoEConfig:
    """AquilaMoE's Scale-Out (arXiv 2408.06567): 8 copies of the dense MLP, top-2 (Mixtral routing),
    aux loss 0.001, z-loss 0.01, dropless. Exactly the dense function after upcycling."""
    return MoEConfig(num_experts=8, top_k=2, aux_loss_coeff=0.001, z_loss_coeff=0.01)


def fine_grained_drop() -> MoEConfig:
    """The Scale-Out study's best setting (bench/scale_out.py, docs/moe.md): 32 experts of width F/4, top-4
    (virtual-group granular upcycling, arXiv 2410.07524: the dense model's active FLOPs), Drop-Upcycling
    r = 0.5 (arXiv 2502.19261), z-loss 0.001 (ST-MoE's). On tiny -> tiny-large it reaches the continued dense
    run's loss with 0.70x its FLOPs (median of 3 seeds, 1920-step budget), where plain 8x top-2 never catches
    up at equal FLOPs. Not function preserving: half of every expert's units are re-drawn."""
    return MoEConfig(num_experts=32, top_k=4, granularity=4, drop_upcycling_ratio=0.5, z_loss_coeff=0.001)


MOE_PRESETS: dict[str, Callable[[], MoEConfig]] = {
    "aquilamoe": aquilamoe,
    "fine-grained-drop": fine_grained_drop,
}


def get_moe_preset(name: str) -> MoEConfig:
    """A fresh MoEConfig for a Scale-Out preset name; unknown names list the valid ones."""
    return from_registry(MOE_PRESETS, name, "MoE")


def tiny() -> ModelConfig:
    """2 layers, d 64, 8 query / 2 KV heads: the unit-test model (7B's shape family in miniature)."""
    return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=8,
                       num_kv_heads=2, max_seq_len=128, rope_theta=10_000.0)


def tiny_large() -> ModelConfig:
    """tiny grown 1.25x wide (GQA groups of 4 -> 5 heads, as 7B -> 16B) and 2x deep."""
    return ModelConfig(vocab_size=512, hidden_size=80, intermediate_size=220, num_layers=4, num_heads=10,
                       num_kv_heads=2, max_seq_len=128, rope_theta=10_000.0)


def tiny_moe() -> ModelConfig:
    """tiny with every MLP an 8-expert top-2 MoE layer."""
    cfg = tiny()
    cfg.moe = aquilamoe()
    return cfg


def demo_small() -> ModelConfig:
    """~7M parameters: the small dense model of the CPU demo recipe."""
    return ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                       num_kv_heads=2, max_seq_len=256, rope_theta=10_000.0)


def demo_large() -> ModelConfig:
    """~12M parameters: demo_small grown 1.25x wide and 1.5x deep."""
    return ModelConfig(vocab_size=8192, hidden_size=320, intermediate_size=880, num_layers=6, num_heads=10,
                       num_kv_heads=2, max_seq_len=256, rope_theta=10_000.0)


def aquila3_7b() -> ModelConfig:
    """Aquila3 7B: 32 layers, d 4096, F 14336, 32 query / 8 KV heads, 4k context, QKV bias."""
    return ModelConfig(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8)


def aquila3_16b() -> ModelConfig:
    """Aquila3 16B: 40 layers, d 5120, F 20480, 40 query / 8 KV heads (grown from 7B by AKI-Pro)."""
    return ModelConfig(hidden_size=5120, intermediate_size=20480, num_layers=40, num_heads=40, num_kv_heads=8)


def aquila3_8x16b() -> ModelConfig:
    """AquilaMoE 8x16B: the 16B shape with 8 experts, top-2 (~100B total, ~30B active)."""
    cfg = aquila3_16b()
    cfg.moe = aquilamoe()
    return cfg


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "tiny-large": tiny_large,
    "tiny-moe": tiny_moe,
    "demo-small": demo_small,
    "demo-large": demo_large,
    "aquila3-7b": aquila3_7b,
    "aquila3-16b": aquila3_16b,
    "aquila3-8x16b": aquila3_8x16b,
}


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a preset name; unknown names list the valid ones."""
    return from_registry(PRESETS, name, "model")

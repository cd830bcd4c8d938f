"""The registry of Hugging Face architectures we convert to and from (STYLE.md rules 2 and 5).

Each entry is declarative: one key map (ours -> HF, reverse derived), one config field map, the constant
config entries an HF loader needs, and the conditions under which our model fits the architecture.
Dense Aquila3 is Qwen2 (GQA + QKV bias + SwiGLU + RMSNorm); without QKV bias it is Llama.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from aquila_ray.config import ModelConfig
from aquila_ray.hf.keymap import KeyMap

DECODER_KEYS = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{layer}.attn_norm.weight": "model.layers.{layer}.input_layernorm.weight",
    "layers.{layer}.attn.q_proj.weight": "model.layers.{layer}.self_attn.q_proj.weight",
    "layers.{layer}.attn.k_proj.weight": "model.layers.{layer}.self_attn.k_proj.weight",
    "layers.{layer}.attn.v_proj.weight": "model.layers.{layer}.self_attn.v_proj.weight",
    "layers.{layer}.attn.q_proj.bias": "model.layers.{layer}.self_attn.q_proj.bias",
    "layers.{layer}.attn.k_proj.bias": "model.layers.{layer}.self_attn.k_proj.bias",
    "layers.{layer}.attn.v_proj.bias": "model.layers.{layer}.self_attn.v_proj.bias",
    "layers.{layer}.attn.o_proj.weight": "model.layers.{layer}.self_attn.o_proj.weight",
    "layers.{layer}.mlp_norm.weight": "model.layers.{layer}.post_attention_layernorm.weight",
}
"""Attention, norms and embeddings: shared by every decoder architecture below."""

DENSE_MLP_KEYS = {
    "layers.{layer}.mlp.gate_proj.weight": "model.layers.{layer}.mlp.gate_proj.weight",
    "layers.{layer}.mlp.up_proj.weight": "model.layers.{layer}.mlp.up_proj.weight",
    "layers.{layer}.mlp.down_proj.weight": "model.layers.{layer}.mlp.down_proj.weight",
}

DECODER_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}
"""Our ModelConfig field (dotted for nested) -> HF config field. rope_theta is handled by the converter
(transformers 5 nests it under rope_parameters)."""


@dataclass(frozen=True)
class HFArchitecture:
    name: str
    architecture: str
    """The HF class written to config.json ``architectures``."""
    model_type: str
    keys: KeyMap
    fields: dict[str, str]
    constants: dict[str, Any]
    """Written on export; on import each must hold (or be absent) or the model is not ours to load."""
    fits: Callable[[ModelConfig], str | None]
    """None if our model can be expressed in this architecture, else the reason it cannot."""
    export_config: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}
    """Extra HF config entries derived from our config (MoE sizes, routing flags)."""
    import_config: Callable[[dict[str, Any]], dict[str, Any]] = lambda hf: {}
    """Extra fields of our config (dotted names) derived from the HF config."""
    export_tensors: Callable[[ModelConfig, torch.dtype], dict[str, torch.Tensor]] = lambda cfg, dt: {}
    """HF tensors with no counterpart in our model, written so the function is unchanged (zeros)."""
    import_unmapped: Callable[[str, torch.Tensor], str | None] = lambda key, t: f"unknown tensor {key!r}"
    """For an HF tensor without our name: None if it may be dropped without changing the function,
    else the reason it cannot."""
    extra: dict[str, Any] = field(default_factory=dict)


def _dense_fits(bias: bool) -> Callable[[ModelConfig], str | None]:
    def fits(cfg: ModelConfig) -> str | None:
        if cfg.moe is not None:
            return "the model is a Mixture of Experts"
        if cfg.qkv_bias != bias:
            return f"qkv_bias={cfg.qkv_bias} (this architecture has qkv bias={bias})"
        return None

    return fits


QWEN2 = HFArchitecture(
    name="qwen2",
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    keys=KeyMap({**DECODER_KEYS, **DENSE_MLP_KEYS}),
    fields=DECODER_FIELDS,
    constants={"hidden_act": "silu", "attention_dropout": 0.0, "use_sliding_window": False},
    fits=_dense_fits(bias=True),
    import_config=lambda hf: {"qkv_bias": True},
)

LLAMA = HFArchitecture(
    name="llama",
    architecture="LlamaForCausalLM",
    model_type="llama",
    keys=KeyMap({**DECODER_KEYS, **DENSE_MLP_KEYS}),
    fields=DECODER_FIELDS,
    constants={"hidden_act": "silu", "attention_dropout": 0.0, "attention_bias": False, "mlp_bias": False},
    fits=_dense_fits(bias=False),
    import_config=lambda hf: {"qkv_bias": False},
)


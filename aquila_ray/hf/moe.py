"""Hugging Face MoE architectures: Qwen2-MoE (models with QKV bias) and Mixtral (without).

Listed in ``aquila_ray.hf.registry.ARCHITECTURES`` with the dense ones. Both load
with transformers 5, which fuses experts in memory (``experts.gate_up_proj`` (E, 2F, D)) but reads and
writes the per-expert layout on disk, the one mapped here (checked with ``save_pretrained`` on 5.23):
- Qwen2-MoE: ``model.layers.{l}.mlp.gate.weight`` (router), ``mlp.experts.{e}.{gate,up,down}_proj.weight``.
  It always builds a shared expert, added as ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``: we
  write it with all-zero weights (its down_proj zero makes it contribute exactly 0) and 1 unit wide; on
  import a non-zero shared down_proj is refused. Routing is softmax over all experts, top-k, and
  renormalization iff ``norm_topk_prob`` (transformers' default False): our ``topk_then_softmax`` equals
  softmax-top-k-renormalize, so ``norm_topk_prob = True`` for it and for ``renormalize``.
- Mixtral: ``model.layers.{l}.block_sparse_moe.gate.weight`` and ``...experts.{e}.w1`` (gate), ``w3`` (up),
  ``w2`` (down); always renormalizes, so only renormalized routing fits; HF ``intermediate_size`` is the
  expert width.
HF MoE inference is dropless; a ``capacity_factor`` only affects training and is not exported. Expert
widths that are not multiples of 8 export with ``experts_implementation: eager`` (``_experts_kernel``).
"""

from __future__ import annotations

from typing import Any

import torch

from aquila_ray.config import ModelConfig
from aquila_ray.hf.architectures import DECODER_FIELDS, DECODER_KEYS, HFArchitecture
from aquila_ray.hf.keymap import KeyMap

_EXPERT = "layers.{layer}.mlp.experts.{expert}."

SHARED_EXPERT_WIDTH = 1
"""Width of the zeroed shared expert written to Qwen2-MoE (any width gives 0; 1 costs nothing)."""


def _renormalized(cfg: ModelConfig) -> bool:
    assert cfg.moe is not None
    return cfg.moe.router_order == "topk_then_softmax" or cfg.moe.renormalize


def _moe_fits(bias: bool, needs_renormalized: bool):  # type: ignore[no-untyped-def]
    def fits(cfg: ModelConfig) -> str | None:
        if cfg.moe is None:
            return "the model is dense"
        if cfg.qkv_bias != bias:
            return f"qkv_bias={cfg.qkv_bias} (this architecture has qkv bias={bias})"
        if cfg.moe.bias_update_rate > 0:
            return (f"the routers carry a load-balancing selection bias (MoEConfig.bias_update_rate="
                    f"{cfg.moe.bias_update_rate}), which this architecture's routing has no place for")
        if needs_renormalized and not _renormalized(cfg):
            return ("routing is softmax_then_topk without renormalization; Mixtral always renormalizes "
                    "(export as qwen2_moe, which has norm_topk_prob=false)")
        return None

    return fits


def _experts_kernel(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5 runs experts with torch's grouped_mm by default, whose rows must start on 16-byte
    boundaries ("strides should be multiple of 16 bytes" otherwise): hidden and expert widths that are
    multiples of 8 fit in bf16 and fp32. For others (granular upcycling's F/G, e.g. 220 / 4 = 55) the
    config asks for transformers' per-expert loop (``experts_implementation: eager``, read from config.json)."""
    aligned = cfg.hidden_size % 8 == 0 and cfg.expert_intermediate_size % 8 == 0
    return {} if aligned else {"experts_implementation": "eager"}


def _qwen2_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    assert cfg.moe is not None
    return {**_experts_kernel(cfg), "num_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k,
            "moe_intermediate_size": cfg.expert_intermediate_size,
            "shared_expert_intermediate_size": SHARED_EXPERT_WIDTH, "norm_topk_prob": _renormalized(cfg),
            "router_aux_loss_coef": cfg.moe.aux_loss_coeff, "output_router_logits": False}


def _qwen2_moe_import(hf: dict[str, Any]) -> dict[str, Any]:
    return {"qkv_bias": True, "moe.num_experts": hf["num_experts"], "moe.top_k": hf["num_experts_per_tok"],
            "moe.expert_intermediate_size": hf["moe_intermediate_size"],
            "moe.router_order": "softmax_then_topk", "moe.renormalize": bool(hf.get("norm_topk_prob", False)),
            "moe.aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.001))}


def _qwen2_moe_shared(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    D, S = cfg.hidden_size, SHARED_EXPERT_WIDTH
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp."
        out[p + "shared_expert.gate_proj.weight"] = torch.zeros(S, D, dtype=dtype)
        out[p + "shared_expert.up_proj.weight"] = torch.zeros(S, D, dtype=dtype)
        out[p + "shared_expert.down_proj.weight"] = torch.zeros(D, S, dtype=dtype)
        out[p + "shared_expert_gate.weight"] = torch.zeros(1, D, dtype=dtype)
    return out


def _qwen2_moe_unmapped(key: str, t: torch.Tensor) -> str | None:
    if ".mlp.shared_expert" not in key:
        return f"unknown tensor {key!r}"
    if key.endswith("shared_expert.down_proj.weight") and bool(t.abs().max() > 0):
        return (f"{key} is non-zero: the model uses a shared expert, which aquila-ray's MoE layer does not "
                f"have (only a zeroed shared expert converts exactly)")
    return None  # gate/up/gate-scalar are irrelevant once every layer's shared down_proj is zero


QWEN2_MOE = HFArchitecture(
    name="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    keys=KeyMap({
        **DECODER_KEYS,
        "layers.{layer}.mlp.router.weight": "model.layers.{layer}.mlp.gate.weight",
        **{f"{_EXPERT}{n}.weight": f"model.{_EXPERT}{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")},
    }),
    fields=DECODER_FIELDS,
    constants={"hidden_act": "silu", "attention_dropout": 0.0, "use_sliding_window": False, "decoder_sparse_step": 1,
               "mlp_only_layers": [], "qkv_bias": True},
    fits=_moe_fits(bias=True, needs_renormalized=False),
    export_config=_qwen2_moe_config,
    import_config=_qwen2_moe_import,
    export_tensors=_qwen2_moe_shared,
    import_unmapped=_qwen2_moe_unmapped,
)


def _mixtral_config(cfg: ModelConfig) -> dict[str, Any]:
    assert cfg.moe is not None
    return {**_experts_kernel(cfg), "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k,
            "intermediate_size": cfg.expert_intermediate_size, "router_aux_loss_coef": cfg.moe.aux_loss_coeff,
            "output_router_logits": False, "sliding_window": None}


def _mixtral_import(hf: dict[str, Any]) -> dict[str, Any]:
    return {"qkv_bias": False, "moe.num_experts": hf["num_local_experts"], "moe.top_k": hf["num_experts_per_tok"],
            "moe.router_order": "topk_then_softmax", "moe.renormalize": True,
            "moe.aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.001))}


MIXTRAL = HFArchitecture(
    name="mixtral",
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    keys=KeyMap({
        **DECODER_KEYS,
        "layers.{layer}.mlp.router.weight": "model.layers.{layer}.block_sparse_moe.gate.weight",
        **{f"{_EXPERT}{ours}.weight": f"model.layers.{{layer}}.block_sparse_moe.experts.{{expert}}.{theirs}.weight"
           for ours, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))},
    }),
    fields=DECODER_FIELDS,
    constants={"hidden_act": "silu", "attention_dropout": 0.0, "router_jitter_noise": 0.0},
    fits=_moe_fits(bias=False, needs_renormalized=True),
    export_config=_mixtral_config,
    import_config=_mixtral_import,
)

__all__ = ["MIXTRAL", "QWEN2_MOE", "SHARED_EXPERT_WIDTH"]

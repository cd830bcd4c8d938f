"""HF export of upcycled MoE models reproduces our logits in transformers (Qwen2-MoE with QKV bias,
Mixtral without); import brings back the same weights. Experts are perturbed after upcycling (as after
training) and the router std raised, so a wrong routing or expert mapping would change the logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aquila_ray.checkpoint import load_model, load_state_dict, save_checkpoint
from aquila_ray.config import apply_overrides, get_preset
from aquila_ray.errors import ConversionError
from aquila_ray.hf import export_hf, import_hf
from aquila_ray.model import build_model
from aquila_ray.upcycle import UpcycleOptions, moe_config, upcycle_state_dict

transformers = pytest.importorskip("transformers")


def _upcycled(tmp: Path, qkv_bias: bool, num_experts: int = 8, top_k: int = 2, granularity: int = 1,
              **moe: object) -> Path:
    src = apply_overrides(get_preset("tiny"), [f"qkv_bias={str(qkv_bias).lower()}"])
    dense = build_model(src, seed=0)
    dst = moe_config(src, num_experts, top_k, granularity, router_init_std=1.0, **moe)
    sd = upcycle_state_dict(dense.state_dict(), src, dst, UpcycleOptions(seed=2))
    g = torch.Generator().manual_seed(0)
    for k in sd:
        if ".experts." in k:
            sd[k] = sd[k] + 0.02 * torch.randn(sd[k].shape, generator=g)
    save_checkpoint(tmp / "moe", sd, dst)
    return tmp / "moe"


@pytest.mark.parametrize("qkv_bias,arch,moe", [
    (True, "Qwen2MoeForCausalLM", {}),
    (True, "Qwen2MoeForCausalLM", {"router_order": "softmax_then_topk", "renormalize": False}),
    (False, "MixtralForCausalLM", {}),
    # granular experts 176 / 8 = 22 wide: rows of 88 bytes, which transformers' default grouped_mm kernel refuses
    # (16-byte alignment); the export asks for its eager experts
    (True, "Qwen2MoeForCausalLM", {"num_experts": 16, "top_k": 8, "granularity": 8}),
    (False, "MixtralForCausalLM", {"num_experts": 16, "top_k": 8, "granularity": 8}),
])
def test_export_reproduces_logits_and_imports_back(tmp_path: Path, qkv_bias: bool, arch: str,
                                                   moe: dict[str, object]) -> None:
    ckpt = _upcycled(tmp_path, qkv_bias, **moe)
    export_hf(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    ours = load_model(ckpt)
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x).logits).abs().max().item()
    assert diff < 1e-4
    import_hf(tmp_path / "hf", tmp_path / "back")
    back_sd, back_cfg = load_state_dict(tmp_path / "back")
    orig_sd, orig_cfg = load_state_dict(ckpt)
    assert back_sd.keys() == orig_sd.keys() and all(torch.equal(back_sd[k], orig_sd[k]) for k in orig_sd)
    with torch.no_grad():
        assert (load_model(tmp_path / "back")(x).logits - ours(x).logits).abs().max() < 1e-5


def test_mixtral_refuses_unrenormalized_routing_and_shared_expert_must_be_zero(tmp_path: Path) -> None:
    ckpt = _upcycled(tmp_path, False, router_order="softmax_then_topk", renormalize=False)
    with pytest.raises(ConversionError, match="Mixtral always renormalizes"):
        export_hf(ckpt, tmp_path / "hf", arch="mixtral")
    ckpt = _upcycled(tmp_path / "q", True)
    export_hf(ckpt, tmp_path / "qhf")
    from safetensors.torch import load_file, save_file

    f = tmp_path / "qhf" / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.shared_expert.down_proj.weight"] += 1.0
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="shared_expert.down_proj.weight is non-zero"):
        import_hf(tmp_path / "qhf", tmp_path / "back")

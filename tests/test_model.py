"""The Aquila3 decoder: shapes, dtypes, causality, parameter counts, and the import boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from aquila_ray.config import apply_overrides, get_preset
from aquila_ray.model import build_model


def test_forward_shapes_loss_and_param_count() -> None:
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (3, 17))
    out = model(x, labels=x)
    assert out.logits.shape == (3, 17, cfg.vocab_size)
    assert out.loss is not None and abs(out.loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.5
    assert out.aux_loss is None and out.router_stats == []
    assert model.num_params() == cfg.num_params()
    tied = apply_overrides(cfg, ["tie_embeddings=true"])
    assert build_model(tied).num_params() == tied.num_params() == cfg.num_params() - 512 * 64


def test_causal_prefix_is_unchanged_by_later_tokens() -> None:
    model = build_model(get_preset("tiny"), seed=1).eval()
    x = torch.randint(0, 512, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 7) % 512
    with torch.no_grad():
        assert torch.allclose(model(x).logits[:, :8], model(y).logits[:, :8], atol=1e-6)


def test_seeded_init_is_deterministic() -> None:
    a, b = build_model(get_preset("tiny"), seed=3), build_model(get_preset("tiny"), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_bf16_forward_backward_close_to_fp32() -> None:
    cfg = get_preset("tiny")
    m32 = build_model(cfg, seed=0)
    m16 = build_model(cfg, seed=0, dtype=torch.bfloat16)
    x = torch.randint(0, 512, (2, 16))
    out = m16(x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad is not None for p in m16.parameters())
    with torch.no_grad():
        assert (m32(x).logits - out.logits.float()).abs().max() < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu() -> None:
    cfg = get_preset("tiny")
    cpu = build_model(cfg, seed=0)
    gpu = build_model(cfg, seed=0).to("cuda", torch.bfloat16)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (cpu(x).logits - gpu(x.cuda()).logits.float().cpu()).abs().max() < 0.05


def test_model_code_imports_neither_ray_nor_deepspeed() -> None:
    code = (
        "import sys, aquila_ray.model, aquila_ray.checkpoint, aquila_ray.hf, aquila_ray.config\n"
        "import importlib\n"
        "for name in ('aquila_ray.growth', 'aquila_ray.upcycle'):\n"
        "    try: importlib.import_module(name)\n"
        "    except ImportError: pass\n"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct tensors autograd keeps from one training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x[:, :-1], labels=x[:, 1:])
    return sum(seen.values()), out.total_loss


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_activation_checkpointing_keeps_the_numbers_and_the_planned_memory(preset: str) -> None:
    """Every mode gives bit-identical loss and gradients; what the forward keeps is what the plan's formula
    (aquila_ray.plan.activation_bytes, fp32 here) says, within 20%."""
    from aquila_ray.plan import activation_bytes

    cfg = apply_overrides(get_preset(preset), ["num_layers=4"])
    x = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    grads, measured = {}, {}
    for mode in ("none", "full", "selective"):
        model = build_model(cfg, seed=0).train()
        model.activation_checkpointing = mode
        measured[mode], loss = _saved_activation_bytes(model, x)
        loss.backward()
        grads[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        planned = activation_bytes(cfg, 4 * 64, mode, bytes_per_element=4)["stored"]
        assert abs(measured[mode] / planned - 1) < 0.2, (mode, measured[mode], planned)
    for mode in ("full", "selective"):
        assert torch.equal(grads[mode][0], grads["none"][0])
        assert all(torch.equal(g, grads["none"][1][n]) for n, g in grads[mode][1].items()), mode
    assert measured["full"] < measured["selective"] < measured["none"]

"""Scale-Out recipe options, each by its defining property: sequence-wise balance loss, the auxiliary-loss-free
bias balancer (DeepSeek-V3), router and expert learning-rate multipliers, grouped expert GEMMs, and the
per-step router metrics (dropped assignments, imbalance, entropy)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aquila_ray.checkpoint import load_model, save_model
from aquila_ray.config import MoEConfig, get_preset
from aquila_ray.errors import ConfigError, ConversionError
from aquila_ray.hf import export_hf
from aquila_ray.model import MoELayer, build_model
from aquila_ray.moe import load_balancing_loss, route
from aquila_ray.train.engine import param_groups, set_lr
from aquila_ray.train.metrics import router_metrics, router_telemetry
from aquila_ray.train.parallelize import balance_experts
from aquila_ray.upcycle import UpcycleOptions, moe_config, upcycle_state_dict


def _cfg(**moe: object):  # type: ignore[no-untyped-def]
    cfg = get_preset("tiny-moe")
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


@pytest.mark.parametrize("field,value,match", [
    ("aux_loss_scope", "token", r"aux_loss_scope='token' is not valid; choose one of \['batch', 'sequence'\]"),
    ("router_order", "topk", r"router_order='topk' is not valid"),
    ("bias_update_rate", -0.1, r"bias_update_rate=-0.1 must be >= 0"),
    ("router_lr_mult", 0.0, r"router_lr_mult=0.0 must be > 0"),
    ("expert_lr_mult", -1.0, r"expert_lr_mult=-1.0 must be > 0"),
])
def test_bad_moe_options_are_refused_by_name(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MoEConfig(**{field: value})  # type: ignore[arg-type]


def test_sequence_scope_penalizes_sequences_that_are_unbalanced_alone() -> None:
    E, T = 4, 6
    probs = torch.zeros(2 * T, E)
    probs[:T, 0] = probs[T:, 1] = 1.0  # sequence 0 all on expert 0, sequence 1 all on expert 1
    idx = probs.argmax(-1, keepdim=True)
    # over the batch experts 0 and 1 share the load: f = P = (1/2, 1/2, 0, 0) -> coeff * E * 1/2
    assert load_balancing_loss(probs, idx, 0.01).item() == pytest.approx(0.02)
    # each sequence alone is collapsed: f = P = (1, 0, 0, 0) -> coeff * E, averaged over the two
    assert load_balancing_loss(probs, idx, 0.01, sequences=2).item() == pytest.approx(0.04)
    # one sequence: the same number either way
    r = route(torch.randn(T, E, generator=torch.Generator().manual_seed(0)), MoEConfig(num_experts=E))
    assert load_balancing_loss(r.probs_NE, r.expert_idx_Nk, 0.01, sequences=1).item() == pytest.approx(
        load_balancing_loss(r.probs_NE, r.expert_idx_Nk, 0.01).item())
    # the layer passes its batch as the sequences
    x = torch.randn(3, 5, 64)
    for scope, seqs in (("batch", 1), ("sequence", 3)):
        layer = MoELayer(_cfg(aux_loss_scope=scope), 0)
        torch.nn.init.normal_(layer.router.weight, std=0.5)
        _, stats = layer(x)
        r = route(layer.router(x.reshape(15, 64)), layer.moe)
        torch.testing.assert_close(stats.aux_loss, load_balancing_loss(r.probs_NE, r.expert_idx_Nk, 0.001, seqs))


@pytest.mark.parametrize("order,rate", [("topk_then_softmax", 0.02), ("softmax_then_topk", 0.002)])
def test_bias_balancer_evens_a_skewed_router_and_leaves_the_weights_alone(order: str, rate: float) -> None:
    layer = MoELayer(_cfg(bias_update_rate=rate, router_order=order), 0)  # rate in logit / probability units
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(8, 64, generator=g) * 0.1)
        layer.router.weight[0] += 0.03  # expert 0 is everyone's favourite (logit about +1)
    x = torch.rand(1, 256, 64, generator=g)
    imbalance = []
    with torch.no_grad():
        for _ in range(100):
            _, stats = layer(x)
            load = stats.tokens_per_expert.double()
            imbalance.append(float(load.max() / load.mean()))
            balance_experts(torch.nn.ModuleList([layer]), load.unsqueeze(0))
    assert imbalance[0] > 3.5 and max(imbalance[-20:]) < 1.2, imbalance[::10]
    bias = layer.router.expert_bias
    assert bias is not None and bias[0] < 0 and bias.dtype == torch.float32
    # every update is +-rate per expert: the bias is an integer multiple of it
    steps = bias / rate
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    # the bias picks the experts; the weights are the unbiased scores of the picked ones
    logits = layer.router(x.reshape(256, 64))
    r = route(logits, layer.moe, bias)
    assert not torch.equal(r.expert_idx_Nk, route(logits, layer.moe).expert_idx_Nk)
    picked = logits.gather(-1, r.expert_idx_Nk)
    expected = picked.softmax(-1) if order == "topk_then_softmax" else logits.softmax(-1).gather(-1, r.expert_idx_Nk)
    if order == "softmax_then_topk":
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(r.weight_Nk, expected, rtol=0, atol=0)
    # a zero bias routes exactly as no bias
    zero = route(logits, layer.moe, torch.zeros(8))
    assert torch.equal(zero.expert_idx_Nk, route(logits, layer.moe).expert_idx_Nk)
    assert torch.equal(zero.weight_Nk, route(logits, layer.moe).weight_Nk)


def test_balancer_bias_is_model_state_kept_fp32_and_upcycling_stays_exact(tmp_path: Path) -> None:
    assert "layers.0.mlp.router.expert_bias" not in build_model(get_preset("tiny-moe")).state_dict()
    src = get_preset("tiny")
    dst = moe_config(src, 8, 2, bias_update_rate=0.001, router_init_std=1.0)
    dense = build_model(src, seed=3)
    sd = upcycle_state_dict(dense.state_dict(), src, dst, UpcycleOptions(seed=1))
    assert torch.equal(sd["layers.1.mlp.router.expert_bias"], torch.zeros(8))
    moe = build_model(dst, seed=None)
    moe.load_state_dict(sd)
    ids = torch.randint(0, src.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        moe.layers[0].mlp.router.expert_bias.fill_(0.123456789)  # type: ignore[union-attr]
    assert moe.to(torch.bfloat16).layers[0].mlp.router.expert_bias.dtype == torch.float32
    moe = moe.float()
    save_model(moe, tmp_path / "moe")
    back = load_model(tmp_path / "moe")
    assert torch.equal(back.layers[0].mlp.router.expert_bias, torch.full((8,), 0.123456789))  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match=r"load-balancing selection bias \(MoEConfig.bias_update_rate=0.001\)"):
        export_hf(tmp_path / "moe", tmp_path / "hf", arch="qwen2_moe")


def test_router_and_expert_lr_multipliers() -> None:
    plain = build_model(get_preset("tiny-moe"))
    assert [g["name"] for g in param_groups(plain, 0.1)] == ["decay", "no_decay"]
    model = build_model(_cfg(router_lr_mult=4.0, expert_lr_mult=0.5))
    groups = param_groups(model, 0.1)
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["decay", "decay.experts", "decay.router", "no_decay"]
    assert len(by_name["decay.router"]["params"]) == 2 and len(by_name["decay.experts"]["params"]) == 2 * 8 * 3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    engine = SimpleNamespace(optimizer=torch.optim.AdamW(groups, lr=1.0))
    set_lr(engine, 1e-3)
    lrs = {g["name"]: g["lr"] for g in engine.optimizer.param_groups}
    assert lrs == {"decay": 1e-3, "no_decay": 1e-3, "decay.router": 4e-3, "decay.experts": 5e-4}


def test_grouped_gemm_path_equals_per_expert_matmuls() -> None:
    cfg = _cfg()
    layers = [MoELayer(cfg, 0), MoELayer(cfg, 0)]
    layers[1].load_state_dict(layers[0].state_dict())
    for p in layers[0].parameters():
        torch.nn.init.normal_(p, std=0.2)
    layers[1].load_state_dict(layers[0].state_dict())
    layers[0].grouped_mm, layers[1].grouped_mm = True, False
    x = torch.randn(2, 24, cfg.hidden_size)
    outs = []
    for layer in layers:
        y, stats = layer(x)
        (y.square().mean() + stats.aux_loss).backward()
        outs.append((y, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for name, grad in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][name], grad, msg=name)


def test_router_metrics_count_drops_and_entropy() -> None:
    layer = MoELayer(_cfg(capacity_factor=0.5), 0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # every token prefers expert 0 -> overflow
    x = torch.rand(2, 20, 64)
    stats = [layer(x)[1], layer(x)[1]]  # two layers' worth of the same routing
    summed = router_telemetry(stats) * 2  # as if two micro-batches
    row = router_metrics(summed, micro_batches=2)
    C = math.ceil(0.5 * 40 * 2 / 8)
    assert row["moe/layer1/expert0_tokens"] == 2 * C
    assert row["moe/dropped_assignments"] == 2 * 2 * (40 * 2 - int(stats[0].tokens_per_expert.sum()))
    with torch.no_grad():
        probs = layer.router(x.reshape(40, 64)).softmax(-1)
    expected = float(-(probs * probs.log()).sum(-1).mean())
    assert row["moe/layer0/router_entropy"] == pytest.approx(expected, rel=1e-5)
    assert 0 < expected < math.log(8)

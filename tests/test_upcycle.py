"""Upcycling: exactness (plain and granular), online == offline, checkpoint round trip, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from aquila_ray.checkpoint import load_model, save_model
from aquila_ray.config import get_preset
from aquila_ray.errors import ConfigError
from aquila_ray.model import build_model
from aquila_ray.moe import ExpertParallel
from aquila_ray.upcycle import (
    REPORT_NAME,
    UpcycleOptions,
    build_upcycled_model,
    dropped_units,
    exactly_preserving,
    moe_config,
    upcycle_checkpoint,
    upcycle_state_dict,
    weight_scale,
)


def _logit_diff(src_model, dst_cfg, sd, tokens):  # type: ignore[no-untyped-def]
    moe = build_model(dst_cfg, seed=None)
    moe.load_state_dict(sd)
    with torch.no_grad():
        return (src_model.eval()(tokens).logits - moe.eval()(tokens).logits).abs().max().item()


@pytest.fixture(scope="module")
def dense():  # type: ignore[no-untyped-def]
    cfg = get_preset("tiny")
    return cfg, build_model(cfg, seed=0)


TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("order,renorm", [("topk_then_softmax", True), ("softmax_then_topk", True)])
def test_plain_upcycling_is_exact(dense, order: str, renorm: bool) -> None:  # type: ignore[no-untyped-def]
    src, model = dense
    dst = moe_config(src, 8, 2, router_order=order, renormalize=renorm)
    sd = upcycle_state_dict(model.state_dict(), src, dst, UpcycleOptions(seed=3))
    assert _logit_diff(model, dst, sd, TOKENS) < 1e-5


def test_granular_upcycling_with_weight_scaling(dense) -> None:  # type: ignore[no-untyped-def]
    """2410.07524 virtual groups: E=8, G=2 (experts are half-width slices), top_k=4 (two whole groups).
    With renormalized routing and down_proj scaled by G the MoE is the dense MLP up to float rounding
    (< 1e-5 in fp32: exact). Without weight scaling the output of every MLP is halved (not exact).
    softmax_then_topk without renormalization is preserved only in expectation (scale E*G/k at uniform
    routing): its logits stay close but not exact, and the test checks just that."""
    src, model = dense
    dst = moe_config(src, 8, 4, granularity=2)
    assert dst.expert_intermediate_size == src.intermediate_size // 2
    sd = upcycle_state_dict(model.state_dict(), src, dst, UpcycleOptions(seed=0))
    torch.testing.assert_close(sd["layers.0.mlp.router.weight"][0], sd["layers.0.mlp.router.weight"][1])
    assert _logit_diff(model, dst, sd, TOKENS) < 1e-5
    unscaled = upcycle_state_dict(model.state_dict(), src, dst, UpcycleOptions(weight_scaling=False))
    assert _logit_diff(model, dst, unscaled, TOKENS) > 1e-3
    raw = moe_config(src, 8, 4, granularity=2, router_order="softmax_then_topk", renormalize=False)
    approx = _logit_diff(model, raw, upcycle_state_dict(model.state_dict(), src, raw), TOKENS)
    assert 1e-6 < approx < 0.5


def test_upcycle_errors(dense) -> None:  # type: ignore[no-untyped-def]
    src, model = dense
    with pytest.raises(ConfigError, match="top_k=3 is not a multiple of granularity=2"):
        upcycle_state_dict(model.state_dict(), src, moe_config(src, 8, 3, granularity=2), UpcycleOptions())
    with pytest.raises(ConfigError, match="granularity=3 does not divide"):
        moe_config(src, 9, 3, granularity=3)
    bigger = dataclasses.replace(moe_config(src, 8, 2), hidden_size=128, num_heads=8)
    with pytest.raises(ConfigError, match="differs from the dense one"):
        upcycle_state_dict(model.state_dict(), src, bigger)


def test_offline_checkpoint_report_and_online_equal(dense, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, model = dense
    save_model(model, tmp_path / "dense")
    dst = moe_config(src, 8, 2)
    report = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", dst, UpcycleOptions(seed=5))
    assert report["probe"]["max_abs_logit_diff"] < 1e-5 and report["exactly_preserving_expected"]
    assert json.loads((tmp_path / "moe" / REPORT_NAME).read_text())["weight_scale"] == 1.0
    offline = load_model(tmp_path / "moe")
    with torch.no_grad():
        assert (offline(TOKENS).logits - model.eval()(TOKENS).logits).abs().max() < 1e-5
    off_sd = offline.state_dict()
    for rank in range(2):
        online = build_upcycled_model(tmp_path / "dense", dst, ExpertParallel(size=2, rank=rank),
                                      UpcycleOptions(seed=5))
        sd = online.state_dict()
        experts = {k.split(".")[4] for k in sd if ".experts." in k}
        assert experts == {str(e) for e in range(4 * rank, 4 * rank + 4)}  # only its own experts
        assert set(sd) <= set(off_sd)
        for k, v in sd.items():
            assert torch.equal(v, off_sd[k]), k


def test_granular_online_equals_offline(dense, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, model = dense
    save_model(model, tmp_path / "dense")
    dst = moe_config(src, 8, 4, granularity=2)
    off = upcycle_state_dict(model.state_dict(), src, dst, UpcycleOptions(seed=1))
    on = build_upcycled_model(tmp_path / "dense", dst, ExpertParallel(size=4, rank=3), UpcycleOptions(seed=1))
    sd = on.state_dict()
    assert {k.split(".")[4] for k in sd if ".experts." in k} == {"6", "7"}
    assert all(torch.equal(v, off[k]) for k, v in sd.items())


@pytest.mark.parametrize("granularity", [1, 2])
def test_drop_upcycling_reinitializes_exactly_its_units(dense, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        granularity: int) -> None:
    """Drop-Upcycling (arXiv 2502.19261): each expert re-draws round(r * F_e) of its intermediate units (gate and
    up rows, down columns, the same units in all three) from N(mean, std) of the dense matrix; every other
    weight is bit-equal to plain upcycling; the sets differ between experts; online equals offline."""
    src, model = dense
    ratio = 0.5
    plain_cfg = moe_config(src, 8, 2 * granularity, granularity)
    drop_cfg = moe_config(src, 8, 2 * granularity, granularity, drop_upcycling_ratio=ratio)
    sd = model.state_dict()
    plain = upcycle_state_dict(sd, src, plain_cfg, UpcycleOptions(seed=3))
    drop = upcycle_state_dict(sd, src, drop_cfg, UpcycleOptions(seed=3))
    assert set(plain) == set(drop)
    F_e = drop_cfg.expert_intermediate_size
    count = round(ratio * F_e)
    fresh: dict[str, list[torch.Tensor]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
    unit_sets = set()
    for key in plain:
        if ".experts." not in key:
            assert torch.equal(plain[key], drop[key]), key  # router, attention, embeddings untouched
    for layer in range(src.num_layers):
        for e in range(8):
            units = dropped_units(layer, e, drop_cfg, seed=3)
            assert len(units) == count == len(set(units.tolist()))
            unit_sets.add(tuple(units.tolist()))
            kept = torch.ones(F_e, dtype=torch.bool)
            kept[units] = False
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                k = f"layers.{layer}.mlp.experts.{e}.{name}.weight"
                a, b = plain[k], drop[k]
                a_kept, b_kept = (a[kept], b[kept]) if dim == 0 else (a[:, kept], b[:, kept])
                assert torch.equal(a_kept, b_kept), k  # the rest is the copy, bit for bit
                a_new, b_new = (a[units], b[units]) if dim == 0 else (a[:, units], b[:, units])
                differs = (a_new != b_new).any(dim=1 - dim)  # each dropped unit changed
                assert bool(differs.all()), k
                fresh[name].append(b_new.flatten())
    assert len(unit_sets) == src.num_layers * 8  # a different set in every expert of every layer
    for name, values in fresh.items():
        ref = torch.cat([sd[f"layers.{layer}.mlp.{name}.weight"].flatten() for layer in range(src.num_layers)])
        if name == "down_proj":  # weight scaling (G) applies to fresh and copied units alike
            ref = ref * weight_scale(drop_cfg)
        got = torch.cat(values)
        # drawn per layer from that layer's statistics; pooled, they match the pooled dense ones within sampling error
        assert abs(got.std().item() / ref.std().item() - 1) < 0.05, name
        assert abs(got.mean().item() - ref.mean().item()) < 5 * ref.std().item() / got.numel() ** 0.5, name
    assert not exactly_preserving(drop_cfg) and exactly_preserving(plain_cfg)
    save_model(model, tmp_path / "dense")
    report = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", drop_cfg, UpcycleOptions(seed=3))
    assert "Drop-Upcycling" in report["method"] and not report["exactly_preserving_expected"]
    assert report["probe"]["max_abs_logit_diff"] > 1e-3  # the report shows the function changed
    online = build_upcycled_model(tmp_path / "dense", drop_cfg, ExpertParallel(size=2, rank=1), UpcycleOptions(seed=3))
    assert all(torch.equal(v, drop[k]) for k, v in online.state_dict().items())
    other_seed = upcycle_state_dict(sd, src, drop_cfg, UpcycleOptions(seed=4))
    key = "layers.0.mlp.experts.0.gate_proj.weight"
    assert not torch.equal(other_seed[key], drop[key])  # the seed picks the units and the draws


def test_drop_upcycling_ratio_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"MoEConfig.drop_upcycling_ratio=1.5 must lie in \[0, 1\]"):
        moe_config(get_preset("tiny"), 8, 2, drop_upcycling_ratio=1.5)

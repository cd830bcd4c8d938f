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
    moe_config,
    upcycle_checkpoint,
    upcycle_state_dict,
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

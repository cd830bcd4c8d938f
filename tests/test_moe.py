"""MoE layer: routing bookkeeping, losses, capacity dropping, router init, checkpoint keys, determinism."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from aquila_ray.config import MoEConfig, get_preset
from aquila_ray.errors import ConfigError
from aquila_ray.model import Aquila3, MoELayer, build_model
from aquila_ray.moe import ExpertParallel, dispatch_combine, load_balancing_loss, route, router_z_loss


def _cfg(**moe: object):  # type: ignore[no-untyped-def]
    cfg = get_preset("tiny-moe")
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


@pytest.mark.parametrize("order,renorm", [("topk_then_softmax", True), ("softmax_then_topk", True)])
def test_each_token_dispatched_k_times_and_weights_sum_to_one(order: str, renorm: bool) -> None:
    moe = MoEConfig(num_experts=8, top_k=2, router_order=order, renormalize=renorm)  # type: ignore[arg-type]
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    r = route(logits, moe)
    assert r.expert_idx_Nk.shape == (50, 2)
    assert all(len(set(row)) == 2 for row in r.expert_idx_Nk.tolist())  # k distinct experts per token
    torch.testing.assert_close(r.weight_Nk.sum(-1), torch.ones(50))
    # the dispatcher sends every token to exactly its k experts: count the rows each expert sees
    seen: list[torch.Tensor] = []

    def run(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        seen.append(xs.clone())
        assert sum(counts) == 100
        return xs

    x = torch.arange(50, dtype=torch.float32).unsqueeze(-1)  # token id as its feature
    out = dispatch_combine(x, r.expert_idx_Nk, r.weight_Nk, 8, run, ExpertParallel())
    assert torch.bincount(seen[0].squeeze(-1).long(), minlength=50).tolist() == [2] * 50
    assert out.tokens_per_expert_E.sum() == 100 and out.dropped_assignments == 0
    torch.testing.assert_close(out.y_ND, x)  # identity experts + weights summing to 1 -> input back


def test_softmax_then_topk_without_renormalization_keeps_selected_mass() -> None:
    moe = MoEConfig(num_experts=8, top_k=2, router_order="softmax_then_topk", renormalize=False)
    logits = torch.randn(10, 8)
    r = route(logits, moe)
    torch.testing.assert_close(r.weight_Nk.sum(-1), logits.softmax(-1).topk(2).values.sum(-1))


def test_uniform_routing_aux_loss_equals_coeff_and_zero_logits_z_loss() -> None:
    E, k, N = 8, 2, 64
    probs = torch.full((N, E), 1.0 / E)
    idx = torch.arange(N * k).remainder(E).view(N, k)  # every expert chosen equally often
    assert load_balancing_loss(probs, idx, 0.001).item() == pytest.approx(0.001, rel=1e-6)
    assert router_z_loss(torch.zeros(N, E), 0.01).item() == pytest.approx(0.01 * math.log(E) ** 2, rel=1e-6)
    # collapsed routing is penalized: all tokens on expert 0 with all probability there -> coeff * E
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed, torch.zeros(N, 1, dtype=torch.long), 0.001).item() == pytest.approx(0.008)


def test_layer_reports_losses_per_layer_and_model_sums_them() -> None:
    cfg = get_preset("tiny-moe")
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(x, labels=x)
    assert len(out.router_stats) == cfg.num_layers
    assert out.aux_loss is not None and out.z_loss is not None
    torch.testing.assert_close(out.aux_loss, sum(s.aux_loss for s in out.router_stats))
    for s in out.router_stats:
        assert s.tokens_per_expert.shape == (8,) and int(s.tokens_per_expert.sum()) == 2 * 16 * 2
        assert s.dropped_tokens == 0
    out.total_loss.backward()
    assert model.layers[0].mlp.router.weight.grad is not None
    assert all(p.grad is not None for p in model.parameters())


def test_capacity_factor_drops_and_counts() -> None:
    cfg = _cfg(capacity_factor=0.5)
    layer = MoELayer(cfg, 0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # every token prefers expert 0 -> overflow
    x = torch.rand(1, 40, cfg.hidden_size)  # positive -> expert 0 logit largest
    _, stats = layer(x)
    C = math.ceil(0.5 * 40 * 2 / 8)
    assert int(stats.tokens_per_expert[0]) == C
    assert stats.dropped_tokens == 40 * 2 - int(stats.tokens_per_expert.sum()) > 0


def test_router_init_std_and_fp32_logits() -> None:
    cfg = _cfg(router_init_std=0.5)
    model = build_model(cfg, seed=0)
    w = model.layers[0].mlp.router.weight
    assert 0.45 < w.std().item() < 0.55  # not the model's init_std 0.02
    bf16 = build_model(cfg, seed=0, dtype=torch.bfloat16)
    assert bf16.layers[0].mlp.router(torch.randn(3, cfg.hidden_size, dtype=torch.bfloat16)).dtype == torch.float32


def test_state_dict_has_per_expert_contract_keys() -> None:
    cfg = get_preset("tiny-moe")
    with torch.device("meta"):
        sd = Aquila3(cfg).state_dict()
    F, D = cfg.expert_intermediate_size, cfg.hidden_size
    assert sd["layers.1.mlp.router.weight"].shape == (8, D)
    assert sd["layers.1.mlp.experts.7.gate_proj.weight"].shape == (F, D)
    assert sd["layers.1.mlp.experts.7.up_proj.weight"].shape == (F, D)
    assert sd["layers.1.mlp.experts.7.down_proj.weight"].shape == (D, F)
    assert not [k for k in sd if ".mlp." in k and "router" not in k and "experts" not in k]


def test_expert_parallel_share_holds_only_local_experts() -> None:
    cfg = get_preset("tiny-moe")
    layer = MoELayer(cfg, 0, ep=ExpertParallel(size=4, rank=2))
    assert layer.local_expert_ids == [4, 5]
    assert sorted(k.split(".")[1] for k in layer.state_dict() if k.startswith("experts")) == ["4"] * 3 + ["5"] * 3
    full = MoELayer(cfg, 0)
    full.set_expert_parallel(ExpertParallel(size=2, rank=1))
    assert full.local_expert_ids == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="not divisible by the expert-parallel size 3"):
        MoELayer(cfg, 0, ep=ExpertParallel(size=3, rank=0))
    with pytest.raises(ConfigError, match="needs a torch.distributed process group"):
        layer(torch.randn(1, 4, cfg.hidden_size))


def test_eval_routing_is_deterministic() -> None:
    model = build_model(get_preset("tiny-moe"), seed=0).eval()
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_matches_cpu_and_runs_bf16() -> None:
    cfg = get_preset("tiny-moe")
    layer = MoELayer(cfg, 0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 16, cfg.hidden_size)
    gpu = MoELayer(cfg, 0).to("cuda")
    gpu.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert (gpu(x.cuda())[0].cpu() - layer(x)[0]).abs().max() < 1e-4
    gpu = gpu.to(torch.bfloat16)
    y, stats = gpu(x.to("cuda", torch.bfloat16))
    y.float().square().mean().backward()
    assert stats.tokens_per_expert.sum().item() == 64 and torch.isfinite(y).all()
    assert gpu.router.weight.grad is not None

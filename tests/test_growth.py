"""Scale-Up invariants in float64: exact FPI at any width ratio, the paper-norm oracle, GQA-compatible head
maps, AKI/AKI-Pro rows, layer maps, and validation errors (Net2Net, bert2BERT, Apollo, AquilaMoE)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

from aquila_ray.config import ModelConfig, MoEConfig, get_preset
from aquila_ray.errors import ConfigError
from aquila_ray.growth import (
    GrowthConfig,
    grow_state_dict,
    layer_map,
    make_plan,
    target_keys,
    target_shapes,
    use_fp64_norms,
)
from aquila_ray.model import Aquila3
from aquila_ray.model.model import RMSNorm


def _cfg(**kw: object) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=8, num_kv_heads=2,
                max_seq_len=32, rope_theta=10_000.0, rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _random_sd(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random (norms around 1, biases too), so every mapping matters."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in target_shapes(cfg).items():
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        out[k] = 1 + 0.3 * t if k.endswith("norm.weight") else 0.3 * t
    return out


def _model(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> Aquila3:
    with torch.device("meta"):
        model = Aquila3(cfg)
    model.load_state_dict(sd, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return use_fp64_norms(model).eval()  # type: ignore[return-value]


X = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def _logits(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return _model(cfg, sd)(X).logits


def _grow(sd: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig, **kw: object
          ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    opt = GrowthConfig(**kw)  # type: ignore[arg-type]
    plan = make_plan(src, dst, opt)
    return grow_state_dict(sd, src, dst, opt, plan=plan), plan.dst


FPI_CASES = {
    "2x width, 4->8 heads per group": dict(hidden_size=64, num_heads=16, intermediate_size=80),
    "1.25x width (4096->5120 in small), GQA 4->5": dict(hidden_size=40, num_heads=10, intermediate_size=50),
    "1.375x width, odd intermediate": dict(hidden_size=44, num_heads=11, intermediate_size=57, num_kv_heads=1),
    "intermediate only": dict(intermediate_size=71),
    "KV groups 2->4": dict(hidden_size=64, num_heads=16, num_kv_heads=4, intermediate_size=40),
    "identity depth 2->5 + 1.25x": dict(hidden_size=40, num_heads=10, intermediate_size=50, num_layers=5),
}


@pytest.mark.parametrize("case", list(FPI_CASES))
@pytest.mark.parametrize("kind", ["circular", "random"])
def test_fpi_exact_norms_preserve_logits(case: str, kind: str) -> None:
    grow = FPI_CASES[case]
    src = _cfg(num_kv_heads=1, num_heads=8) if grow.get("num_kv_heads") == 1 else _cfg()
    dst = dataclasses.replace(src, **grow)  # type: ignore[arg-type]
    sd = _random_sd(src)
    big, big_cfg = _grow(sd, src, dst, method="fpi", depth_mode="identity", norm_mode="exact", map=kind, seed=3)
    assert big_cfg.rms_norm_eps == pytest.approx(src.rms_norm_eps * src.hidden_size / dst.hidden_size)
    ref = _logits(src, sd)
    assert ref.abs().max() > 1.0
    assert (_logits(big_cfg, big) - ref).abs().max() < 1e-10


def test_fpi_exact_with_tied_embeddings_and_no_bias() -> None:
    src = _cfg(tie_embeddings=True, qkv_bias=False)
    dst = dataclasses.replace(src, hidden_size=40, num_heads=10, num_layers=3)
    sd = _random_sd(src)
    big, big_cfg = _grow(sd, src, dst, method="fpi", depth_mode="identity")
    assert "lm_head.weight" not in big
    assert (_logits(big_cfg, big) - _logits(src, sd)).abs().max() < 1e-10


def test_same_shape_returns_identical_weights() -> None:
    src = _cfg()
    sd = _random_sd(src)
    for method in ("fpi", "aki", "aki-pro"):
        for norm in ("exact", "paper"):
            out, cfg = _grow(sd, src, src, method=method, norm_mode=norm, map="random")
            assert cfg.rms_norm_eps == src.rms_norm_eps
            assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def test_chained_growth_equals_source_and_direct_growth() -> None:
    a = _cfg()
    b = dataclasses.replace(a, hidden_size=40, num_heads=10, intermediate_size=50, num_layers=3)
    c = dataclasses.replace(a, hidden_size=56, num_heads=14, num_kv_heads=2, intermediate_size=77, num_layers=5)
    sd = _random_sd(a)
    opts = dict(method="fpi", depth_mode="identity", map="random", seed=5)
    sd_b, cfg_b = _grow(sd, a, b, **opts)
    sd_bc, cfg_bc = _grow(sd_b, cfg_b, c, **opts)
    sd_ac, cfg_ac = _grow(sd, a, c, **opts)
    assert cfg_bc.rms_norm_eps == pytest.approx(cfg_ac.rms_norm_eps)
    ref = _logits(a, sd)
    assert (_logits(cfg_bc, sd_bc) - ref).abs().max() < 1e-10
    assert (_logits(cfg_ac, sd_ac) - ref).abs().max() < 1e-10


def test_paper_norms_exact_at_integer_ratio_with_circular_map() -> None:
    src = _cfg()
    dst = dataclasses.replace(src, hidden_size=64, num_heads=16, intermediate_size=120)
    sd = _random_sd(src)
    big, cfg = _grow(sd, src, dst, method="fpi", norm_mode="paper", map="circular")
    assert cfg.rms_norm_eps == src.rms_norm_eps
    assert (_logits(cfg, big) - _logits(src, sd)).abs().max() < 1e-10


class _CountWeightedRMSNorm(RMSNorm):
    """The oracle for paper norms: RMS over the grown width, i.e. the source units weighted by copy counts."""

    def __init__(self, norm: RMSNorm, counts: torch.Tensor, target_width: int) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.w = counts / target_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt((x.pow(2) * self.w).sum(-1, keepdim=True) + self.eps)


def test_paper_norms_match_copy_count_weighted_rms_oracle() -> None:
    src = _cfg()
    dst = dataclasses.replace(src, hidden_size=40, num_heads=10, intermediate_size=50)
    sd = _random_sd(src)
    opt = GrowthConfig(method="fpi", norm_mode="paper", map="random", seed=1)
    plan = make_plan(src, dst, opt)
    big = grow_state_dict(sd, src, dst, opt, plan=plan)
    counts = torch.tensor(plan.hidden.counts(), dtype=torch.float64)
    oracle = _model(src, sd)
    for module in list(oracle.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RMSNorm):
                setattr(module, name, _CountWeightedRMSNorm(child, counts, dst.hidden_size))
    with torch.no_grad():
        expected = oracle(X).logits
    grown = _logits(plan.dst, big)
    assert (grown - expected).abs().max() < 1e-10
    assert (grown - _logits(src, sd)).abs().max() > 1e-3  # plain 1/c is not exact at 1.25x


@pytest.mark.parametrize("kind", ["circular", "random"])
@pytest.mark.parametrize(("src_kv", "dst_heads", "dst_kv"), [(2, 10, 2), (2, 24, 4), (8, 40, 8), (1, 13, 1)])
def test_query_heads_stay_in_their_kv_group(kind: str, src_kv: int, dst_heads: int, dst_kv: int) -> None:
    src = _cfg(num_heads=8, num_kv_heads=src_kv)
    dst = dataclasses.replace(src, hidden_size=4 * dst_heads, num_heads=dst_heads, num_kv_heads=dst_kv)
    for method in ("fpi", "aki") if dst_kv != src_kv else ("fpi", "aki", "aki-pro"):
        plan = make_plan(src, dst, GrowthConfig(method=method, map=kind, seed=7))  # type: ignore[arg-type]
        g_s, g_t = src.kv_group_size, dst.kv_group_size
        q = plan.query_heads()
        for h, s in enumerate(q.source):
            assert s // g_s == plan.kv_heads.source[h // g_t]
        # Original heads keep their KV head: target k*G_T+i copies source k*G_S+i.
        for k in range(src.num_kv_heads):
            for i in range(g_s):
                assert q.source[k * g_t + i] == k * g_s + i


def test_layer_maps() -> None:
    assert layer_map(3, 6, "interpolate")[0] == (0, 0, 1, 1, 2, 2)
    layers, _ = layer_map(32, 40, "interpolate")
    assert sorted(s for s in set(layers) if layers.count(s) == 2) == list(range(0, 32, 4))
    assert layer_map(3, 6, "stack")[0] == (0, 1, 2, 0, 1, 2)
    assert layer_map(3, 6, "identity") == ((0, 0, 1, 1, 2, 2), (False, True, False, True, False, True))
    assert layer_map(4, 4, "stack") == ((0, 1, 2, 3), (False,) * 4)


def _aki_setup(method: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], ModelConfig]:
    src = _cfg(num_layers=3)
    dst = dataclasses.replace(src, hidden_size=40, num_heads=10, intermediate_size=50)
    sd = _random_sd(src)
    aki, cfg = _grow(sd, src, dst, method=method, map="random", seed=seed)
    fpi, _ = _grow(sd, src, dst, method="fpi", map="random", seed=seed)
    return aki, fpi, cfg



@pytest.mark.parametrize("method", ["aki", "aki-pro"])
def test_aki_original_rows_are_fpi_new_rows_from_layer_above(method: str) -> None:
    aki, fpi, cfg = _aki_setup(method)
    opt = GrowthConfig(method="fpi", map="random")
    plan = make_plan(_cfg(num_layers=3), cfg, opt)
    new_heads = torch.tensor(plan.new_query_heads()).repeat_interleave(cfg.head_dim)
    new = {"attn.q_proj.weight": new_heads, "attn.q_proj.bias": new_heads,
           "attn.o_proj.weight": torch.tensor(plan.hidden.is_new()), "mlp.down_proj.weight":
           torch.tensor(plan.hidden.is_new()), "mlp.gate_proj.weight": torch.tensor(plan.mlp.is_new()),
           "mlp.up_proj.weight": torch.tensor(plan.mlp.is_new())}
    for layer in range(3):
        for suffix, mask in new.items():
            k = f"layers.{layer}.{suffix}"
            assert mask.any() and torch.equal(aki[k][~mask], fpi[k][~mask]), k
            above = f"layers.{min(layer + 1, 2)}.{suffix}"  # the top layer falls back to FPI (its own rows)
            assert torch.equal(aki[k][mask], fpi[above][mask]), k
            if layer < 2:
                assert not torch.equal(aki[k][mask], fpi[k][mask])
        for suffix in ("attn_norm.weight", "mlp_norm.weight", "attn.k_proj.weight", "attn.v_proj.weight"):
            assert torch.equal(aki[f"layers.{layer}.{suffix}"], fpi[f"layers.{layer}.{suffix}"])
    for k in ("embed.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(aki[k], fpi[k])


def test_aki_new_kv_heads_from_layer_above() -> None:
    src = _cfg(num_layers=2)
    dst = dataclasses.replace(src, hidden_size=64, num_heads=16, num_kv_heads=4)
    sd = _random_sd(src)
    aki, _ = _grow(sd, src, dst, method="aki")
    fpi, _ = _grow(sd, src, dst, method="fpi")
    new = torch.arange(4 * 4) >= 2 * 4  # kv heads 2, 3 are new (head_dim 4)
    k = "layers.0.attn.k_proj.weight"
    assert torch.equal(aki[k][~new], fpi[k][~new]) and torch.equal(aki[k][new], fpi["layers.1.attn.k_proj.weight"][new])


def test_aki_deterministic_for_a_seed_and_depth_modes() -> None:
    a1, _, _ = _aki_setup("aki-pro", seed=4)
    a2, _, _ = _aki_setup("aki-pro", seed=4)
    a3, _, _ = _aki_setup("aki-pro", seed=5)
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
    assert not all(torch.equal(a1[k], a3[k]) for k in a1)
    src = _cfg(num_layers=3)
    dst = dataclasses.replace(src, num_layers=6)
    assert make_plan(src, dst, GrowthConfig(method="aki")).layers == (0, 1, 2, 0, 1, 2)
    assert make_plan(src, dst, GrowthConfig(method="aki-pro")).layers == (0, 0, 1, 1, 2, 2)
    sd = _random_sd(src)
    deep, _ = _grow(sd, src, dst, method="aki-pro")
    assert torch.equal(deep["layers.1.attn.o_proj.weight"], deep["layers.0.attn.o_proj.weight"])
    ident, _ = _grow(sd, src, dst, method="aki-pro", depth_mode="identity")
    assert not ident["layers.1.mlp.down_proj.weight"].any() and ident["layers.2.mlp.down_proj.weight"].any()


def test_stacked_and_interpolated_depth_are_not_function_preserving() -> None:
    src = _cfg(num_layers=2)
    dst = dataclasses.replace(src, num_layers=4)
    sd = _random_sd(src)
    for mode in ("stack", "interpolate"):
        big, cfg = _grow(sd, src, dst, method="fpi", depth_mode=mode)
        assert (_logits(cfg, big) - _logits(src, sd)).abs().max() > 1e-2


def test_aquila3_7b_to_16b_plan_on_configs_only() -> None:
    plan = make_plan(get_preset("aquila3-7b"), get_preset("aquila3-16b"), GrowthConfig(method="aki-pro"))
    s = plan.summary()
    assert s["layer_map"][:6] == [0, 0, 1, 2, 3, 4]
    assert s["hidden_map"]["copy_counts"] == {"1": 3072, "2": 1024}
    assert s["query_head_map_per_group"][0] == [0, 1, 2, 3, 0]
    assert s["target"]["parameters"] > 2 * s["source"]["parameters"]
    assert len(target_keys(plan.dst)) == 3 + 12 * 40


@pytest.mark.parametrize("tie", [False, True])
def test_target_keys_and_shapes_match_the_model(tie: bool) -> None:
    cfg = _cfg(tie_embeddings=tie)
    with torch.device("meta"):
        model = Aquila3(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert target_shapes(cfg) == shapes and set(target_keys(cfg)) == set(shapes)


BAD = [
    (dict(hidden_size=24, num_heads=6), "target hidden_size=24 is smaller than the source's 32"),
    (dict(num_layers=1), "target num_layers=1 is smaller than the source's 2; growth never shrinks"),
    (dict(intermediate_size=36), "target intermediate_size=36 is smaller than the source's 40"),
    (dict(hidden_size=16, num_heads=4, num_kv_heads=1), "target hidden_size=16 is smaller than the source's 32"),
    (dict(max_seq_len=16), "target max_seq_len=16 is smaller than the source's 32"),
    (dict(hidden_size=48, num_heads=8), r"target head_dim=6 .* differs from the source's head_dim=4; .*= 12"),
    (dict(vocab_size=100), r"target vocab_size=100 differs from the source's 97; the vocabulary"),
    (dict(rope_theta=500_000.0), r"target rope_theta=500000.0 differs .* RoPE settings are fixed"),
    (dict(qkv_bias=False), r"target qkv_bias=False differs"),
    (dict(hidden_size=48, num_heads=12, num_kv_heads=3), r"num_kv_heads=3 is not a multiple of the source's 2: "
                                                         r"the KV heads would not tile whole groups"),
    (dict(hidden_size=48, num_heads=12, num_kv_heads=4), r"gives 3 query heads per KV group, fewer than the "
                                                         r"source's 4"),
    (dict(moe=MoEConfig()), "growth works on dense models"),
]


@pytest.mark.parametrize(("change", "match"), BAD)
def test_invalid_targets_raise_config_error(change: dict[str, object], match: str) -> None:
    src = _cfg()
    with pytest.raises(ConfigError, match=match):
        make_plan(src, dataclasses.replace(src, **change), GrowthConfig(method="fpi"))  # type: ignore[arg-type]


def test_aki_pro_keeps_the_kv_groups() -> None:
    src = _cfg()
    dst = dataclasses.replace(src, hidden_size=64, num_heads=16, num_kv_heads=4)
    with pytest.raises(ConfigError, match="method='aki-pro' keeps the number of KV groups, but target "
                                          "num_kv_heads=4 differs from the source's 2"):
        make_plan(src, dst, GrowthConfig(method="aki-pro"))


def test_growth_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"GrowthConfig.method='net2net' is not valid; choose one of \['fpi'"):
        GrowthConfig(method="net2net")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="GrowthConfig.depth_mode='deep' is not valid"):
        GrowthConfig(depth_mode="deep")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="GrowthConfig.probe_batch=0 must be a positive integer"):
        GrowthConfig(probe_batch=0)
    assert GrowthConfig(method="aki").resolved_depth_mode == "stack"
    assert GrowthConfig(method="fpi", depth_mode="identity").resolved_depth_mode == "identity"


def test_pure_transform_leaves_its_input_alone() -> None:
    src = _cfg()
    sd = _random_sd(src)
    before = {k: v.clone() for k, v in sd.items()}
    _grow(sd, src, dataclasses.replace(src, hidden_size=40, num_heads=10), method="aki")
    assert all(torch.equal(sd[k], before[k]) for k in sd)
    assert isinstance(_model(src, sd).norm, nn.Module)


def test_growth_imports_neither_ray_nor_deepspeed() -> None:
    code = "import sys, aquila_ray.growth; bad = {'ray', 'deepspeed'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)

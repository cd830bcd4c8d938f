"""Model configs: validation messages, presets, overrides, and the big presets' sizes on paper."""

from __future__ import annotations

from pathlib import Path

import pytest

from aquila_ray.config import ModelConfig, MoEConfig, apply_overrides, from_dict, get_preset, to_dict
from aquila_ray.errors import ConfigError


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"hidden_size": 100, "num_heads": 8}, r"hidden_size=100 is not divisible by num_heads=8"),
        ({"num_heads": 8, "num_kv_heads": 3}, r"num_heads=8 is not divisible by num_kv_heads=3"),
        ({"hidden_size": 24, "num_heads": 8, "num_kv_heads": 2}, r"head_dim=3 .* must be even"),
        ({"num_layers": 0}, r"num_layers=0 must be a positive integer"),
        ({"vocab_size": -5}, r"vocab_size=-5 must be a positive integer"),
        ({"rms_norm_eps": 0.0}, r"rms_norm_eps=0.0 must be > 0"),
    ],
)
def test_invalid_model_config_names_fields(fields: dict, match: str) -> None:
    base = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"num_experts": 4, "top_k": 5}, r"top_k=5 exceeds num_experts=4"),
        ({"capacity_factor": 0.0}, r"capacity_factor=0.0 must be > 0, or null for dropless"),
        ({"num_experts": 6, "granularity": 4}, r"num_experts=6 must be divisible by granularity=4"),
    ],
)
def test_invalid_moe_config(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MoEConfig(**fields)


def test_unknown_field_and_bad_literal_are_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['hidden'\] for ModelConfig"):
        from_dict(ModelConfig, {"hidden": 3})
    with pytest.raises(ConfigError, match=r"moe.router_order='random' is not valid; choose one of"):
        from_dict(ModelConfig, {"moe": {"router_order": "random"}})
    with pytest.raises(ConfigError, match=r"unknown model preset 'huge'; valid presets: \["):
        get_preset("huge")


def test_dict_round_trip_and_overrides() -> None:
    cfg = get_preset("tiny-moe")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    cfg2 = apply_overrides(cfg, ["hidden_size=128", "moe.top_k=1", "rope_theta=5e5"])
    assert (cfg2.hidden_size, cfg2.moe.top_k, cfg2.rope_theta) == (128, 1, 5e5)
    assert cfg.hidden_size == 64  # the original is untouched
    with pytest.raises(ConfigError, match=r"must look like field.path=value"):
        apply_overrides(cfg, ["hidden_size"])
    with pytest.raises(ConfigError, match=r"num_heads=5 is not divisible"):
        apply_overrides(cfg, {"num_heads": 5, "hidden_size": 70})


def test_seed_presets_sizes_on_paper_and_on_meta_device() -> None:
    from aquila_ray.model import build_model

    b16, moe = get_preset("aquila3-16b"), get_preset("aquila3-8x16b")
    assert 15e9 <= b16.num_params() <= 17e9
    assert 95e9 <= moe.num_params() <= 110e9
    assert 27e9 <= moe.num_params(active=True) <= 31e9
    b7 = get_preset("aquila3-7b")
    assert (b7.head_dim, b16.head_dim, b7.num_kv_heads, b16.num_kv_heads) == (128, 128, 8, 8)
    for cfg in (b7, b16, moe):  # the analytic count is what the module really holds
        assert build_model(cfg, device="meta").num_params() == cfg.num_params()


def test_flops_per_token_formula() -> None:
    cfg = get_preset("aquila3-7b")
    n = cfg.num_params(embeddings=False)
    assert cfg.flops_per_token(4096) == 6 * n + 12 * 32 * 32 * 128 * 4096
    moe = get_preset("aquila3-8x16b")
    assert moe.flops_per_token(1) < 6.1 * moe.num_params(active=True) < 6 * moe.num_params()


def test_evaluation_budget_and_tasks_are_checked(tmp_path: Path) -> None:
    """One validation pass reads min(eval_max_sequences, eval_tokens // seq_len, available) sequences (at
    least one); bad budgets and a missing task file are refused by name before any run."""
    from aquila_ray.config.recipe import build_recipe_config
    from aquila_ray.config.train import TrainConfig
    from aquila_ray.errors import ConfigError

    assert TrainConfig(eval_max_sequences=64, eval_tokens=10_000_000).eval_sequences(128, 117) == 64
    assert TrainConfig(eval_max_sequences=None, eval_tokens=1000).eval_sequences(128, 117) == 7
    assert TrainConfig(eval_max_sequences=None, eval_tokens=None).eval_sequences(128, 117) == 117
    assert TrainConfig(eval_tokens=10).eval_sequences(4096, 10**9) == 1
    with pytest.raises(ConfigError, match=r"TrainConfig.eval_tokens=0 must be a positive integer"):
        TrainConfig(eval_tokens=0)
    with pytest.raises(ConfigError, match=r"TrainConfig.eval_tasks='.*nope.jsonl' is not a file; valid: a JSONL"):
        TrainConfig(eval_tasks=str(tmp_path / "nope.jsonl"))
    assert TrainConfig(eval_tasks="sample").eval_tasks == "sample"
    with pytest.raises(ConfigError, match=r"RecipeConfig.stage_small .*TrainConfig.eval_tokens=-5 must be a positive "):
        build_recipe_config("tiny", None, ["train.eval_tokens=-5"])


def test_one_overlay_merge_for_every_config() -> None:
    """Recipes and the data job merge a YAML overlay on their preset the same way: nested mappings key by key,
    a field named ``whole`` (a mapping-valued field, e.g. the data job's n-gram table) replaced outright."""
    from aquila_ray.config.base import merge_overlay

    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "table": {2: 0.2, 3: 0.18}, "b": 3}
    assert merge_overlay(base, {"a": {"y": {"q": 5}}, "table": {2: 0.5}}) == \
        {"a": {"x": 1, "y": {"p": 1, "q": 5}}, "table": {2: 0.5, 3: 0.18}, "b": 3}
    assert merge_overlay(base, {"table": {2: 0.5}, "b": {"new": 1}}, whole=frozenset({"table"})) == \
        {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "table": {2: 0.5}, "b": {"new": 1}}
    assert base["a"]["y"] == {"p": 1, "q": 2}  # the base is not modified


def test_resolve_is_every_jobs_one_config_path(tmp_path: Path) -> None:
    """``resolve``: defaults <- --config file <- the job's flags <- --set, nested mappings merged key by key; a
    model field takes a preset name or ``{preset: NAME, field: value}``, in a file or in --set."""
    from aquila_ray.config.base import resolve
    from aquila_ray.config.train import TrainConfig
    from aquila_ray.errors import ConfigError

    overlay = tmp_path / "c.yaml"
    overlay.write_text("model: {preset: tiny-moe, num_layers: 3}\nsteps: 5\noptimizer: {lr: 0.1}\n")
    cfg = resolve(TrainConfig, None, overlay, ["model.moe.top_k=1", "steps=7"], {"steps": 6, "optimizer": {"eps": 0.5}})
    moe = cfg.model.moe
    assert moe is not None and (moe.num_experts, moe.top_k) == (8, 1)
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (3, 64)
    assert (cfg.steps, cfg.optimizer.lr, cfg.optimizer.eps, cfg.optimizer.beta2) == (7, 0.1, 0.5, 0.95)
    cfg = resolve(TrainConfig, None, None, ["model=tiny-moe", "model.moe.top_k=1"])
    assert cfg.model.moe is not None and (cfg.model.moe.top_k, cfg.model.num_layers) == (1, 2)
    with pytest.raises(ConfigError, match=r"unknown .*'tiny-xl'"):
        resolve(TrainConfig, None, {"model": "tiny-xl"})

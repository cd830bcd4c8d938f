"""The Scale-Up job: streaming growth of sharded checkpoints, growth_report.json, the CLI (dry run, errors,
--local), the Ray task, and transformers parity of an exported grown model (bert2BERT / AquilaMoE growth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import aquila_ray
from aquila_ray.checkpoint import load_state_dict, save_checkpoint
from aquila_ray.config import get_preset
from aquila_ray.config.growth import GrowthConfig
from aquila_ray.growth import REPORT_NAME, grow_checkpoint, grow_state_dict, make_plan
from aquila_ray.model import build_model
from jobs import scale_up


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (d64, 2 layers, 8/2 heads) in fp32 with random norms, sharded into several files."""
    path = tmp_path_factory.mktemp("growth") / "small"
    model = build_model(get_preset("tiny"), seed=0)
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if k.endswith("norm.weight") or k.endswith(".bias"):
            v.copy_(torch.randn(v.shape, generator=gen) * 0.3 + (1.0 if k.endswith("norm.weight") else 0.0))
    save_checkpoint(path, sd, model.config, max_shard_bytes=200_000)
    return path


def test_streaming_growth_equals_the_pure_transform_and_reports(small: Path, tmp_path: Path) -> None:
    opt = GrowthConfig(method="aki-pro", map="random", seed=3)
    target = get_preset("tiny-large")
    report = grow_checkpoint(small, tmp_path / "large", target, opt, max_shard_bytes=300_000)
    grown, cfg = load_state_dict(tmp_path / "large")
    src_sd, src_cfg = load_state_dict(small)
    expected = grow_state_dict(src_sd, src_cfg, target, opt)
    assert cfg == make_plan(src_cfg, target, opt).dst
    assert grown.keys() == expected.keys() and all(torch.equal(grown[k], expected[k]) for k in grown)
    assert len(list((tmp_path / "large").glob("model-*.safetensors"))) > 1
    on_disk = json.loads((tmp_path / "large" / REPORT_NAME).read_text())
    assert on_disk["method"] == "aki-pro" and on_disk["depth_mode"] == "interpolate" and on_disk["seed"] == 3
    assert on_disk["norm_mode"] == "exact" and on_disk["plan"]["layer_map"] == [0, 0, 1, 1]
    assert on_disk["parameters"] == {"before": src_cfg.num_params(), "after": cfg.num_params()}
    assert on_disk["shapes"]["before"]["embed.weight"] == [512, 64]
    assert on_disk["shapes"]["after"]["embed.weight"] == [512, 80]
    assert on_disk["probe"]["max_abs_logit_diff"] > 1e-3  # AKI-Pro is not function preserving by design
    assert report["function_preserving_by_construction"] is False


def test_exact_fpi_report_measures_preservation(small: Path, tmp_path: Path) -> None:
    opt = GrowthConfig(method="fpi", depth_mode="identity")
    report = grow_checkpoint(small, tmp_path / "large", get_preset("tiny-large"), opt)
    p = report["probe"]
    assert report["function_preserving_by_construction"] is True
    assert p["max_abs_logit_diff"] < 1e-5 * max(1.0, p["max_abs_source_logit"])  # fp32 storage rounding only
    assert p["loss_before"] == pytest.approx(p["loss_after"], abs=1e-5)
    assert set(p) >= {"tokens", "seed", "dtype", "mean_abs_logit_diff"}


def test_job_dry_run_prints_plan_and_writes_nothing(small: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    scale_up.main(["--src", str(small), "--dst", str(tmp_path / "out"), "--target-preset", "tiny-large",
                   "--set", "growth.method=aki", "--dry-run"])
    out = capsys.readouterr().out
    assert '"layer_map": [\n    0,\n    1,\n    0,\n    1\n  ]' in out and '"method": "aki"' in out
    assert "memory_estimate_bytes" in out and not (tmp_path / "out").exists()


def test_job_local_with_explicit_dims(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scale_up.main(["--src", str(small), "--dst", str(tmp_path / "out"), "--method", "fpi", "--depth-mode",
                   "identity", "--hidden-size", "96", "--num-heads", "12", "--local"])
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    after = report["plan"]["target"]["shape"]
    assert after["hidden_size"] == 96 and after["num_layers"] == 2 and after["intermediate_size"] == 176
    assert report["probe"]["max_abs_logit_diff"] < 1e-4


def test_job_errors_name_the_field(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        scale_up.run_main(lambda: scale_up.main(["--src", str(small), "--dst", str(tmp_path / "o"),
                                                 "--hidden-size", "48", "--num-heads", "6", "--local"]))
    assert e.value.code == 2
    assert "ConfigError: target hidden_size=48 is smaller than the source's 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scale_up.run_main(lambda: scale_up.main(["--src", str(small), "--dst", str(tmp_path / "o"),
                                                 "--hidden-size", "96", "--local"]))
    assert "target head_dim=12" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_exported_grown_model_matches_transformers(small: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from aquila_ray.hf import export_hf

    grow_checkpoint(small, tmp_path / "large", get_preset("tiny-large"), GrowthConfig(method="aki-pro"))
    export_hf(tmp_path / "large", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = aquila_ray.load_model(str(tmp_path / "large"))
    x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x).logits).abs().max() < 1e-4


@pytest.mark.ray
def test_job_runs_as_a_ray_task(ray_cluster, small: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scale_up.main(["--src", str(small), "--dst", str(tmp_path / "out"), "--target-preset", "tiny-large",
                   "--method", "fpi", "--depth-mode", "identity", "--max-shard-gb", "0.0002"])
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["probe"]["max_abs_logit_diff"] < 1e-4 and report["plan"]["inserted_identity_layers"] == [1, 3]
    assert aquila_ray.load_model(str(tmp_path / "out")).config.num_layers == 4


@pytest.mark.ray
def test_transform_tasks_start_with_the_transform_environment(ray_cluster) -> None:  # type: ignore[no-untyped-def]
    """PyTorch reads THP_MEM_ALLOC_ENABLE once per process, so the task's worker must start with it."""
    import os

    from aquila_ray.pipeline.tasks import TRANSFORM_ENV, run_task

    seen = run_task(os.getenv, "THP_MEM_ALLOC_ENABLE", env=TRANSFORM_ENV)  # a plain function of a stdlib module
    assert seen == TRANSFORM_ENV["THP_MEM_ALLOC_ENABLE"] == "1"


def test_use_transform_env_fills_in_unset_variables_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from aquila_ray.pipeline.tasks import use_transform_env

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    use_transform_env()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice stands
    use_transform_env()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_scale_up_cli_gets_huge_pages_before_its_first_tensor(small: Path, tmp_path: Path) -> None:
    """PyTorch fixes THP_MEM_ALLOC_ENABLE at the process's first allocation: the --local job must set it first.
    Probe: a fresh 64 MB tensor takes ~16k page faults with 4 KiB pages, a few dozen with huge pages."""
    import os
    import subprocess
    import sys

    code = f"""
import os, resource
import torch
import jobs.scale_up as job
def probe(*args, **kwargs):  # stands in for the growth: measures what a fresh 64 MB tensor costs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 1024 * 1024, dtype=torch.uint8).fill_(1)
    print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return dict.fromkeys(("destination", "method", "depth_mode", "norm_mode", "parameters", "seconds"))
job.run_scale_up = probe
job.main(["--src", {str(small)!r}, "--dst", {str(tmp_path / "out")!r}, "--target-preset", "tiny-large", "--local"])
print("THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("FAULTS", "THP_")))
    assert lines["THP_MEM_ALLOC_ENABLE"] == "1"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():  # the kernel lends huge pages on madvise
        assert int(lines["FAULTS"]) < 4000, f"{lines['FAULTS']} page faults for 64 MB: huge pages are not on"

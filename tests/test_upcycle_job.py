"""jobs.scale_out: --help, --dry-run plan, local run, and the Ray task path on a local cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aquila_ray.checkpoint import load_config, save_model
from aquila_ray.config import get_preset
from aquila_ray.model import build_model
from aquila_ray.upcycle import REPORT_NAME
from jobs import scale_out


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dense") / "ckpt"
    save_model(build_model(get_preset("tiny"), seed=0), d)
    return d


def test_help_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "jobs.scale_out", "--help"], capture_output=True, text=True,
                         check=True)
    assert "--num-experts" in out.stdout and "--granularity" in out.stdout


def test_dry_run_prints_plan(dense_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scale_out.main(["--src", str(dense_dir), "--dst", str(tmp_path / "moe"), "--granularity", "2", "--top-k", "4",
                    "--set", "moe.router_order=softmax_then_topk", "--dry-run"])
    text = capsys.readouterr().out
    plan = json.loads(text[text.index("{"):])
    assert plan["plan"]["weight_scale"] == 2.0 and plan["plan"]["expert_layout"]["virtual_groups"] == 4
    assert plan["config"]["moe"]["router_order"] == "softmax_then_topk"
    assert plan["plan"]["parameters"]["moe_active"] < plan["plan"]["parameters"]["moe_total"]
    assert not (tmp_path / "moe").exists()


def test_local_run_writes_checkpoint_and_report(dense_dir: Path, tmp_path: Path) -> None:
    scale_out.main(["--src", str(dense_dir), "--dst", str(tmp_path / "moe"), "--seed", "4", "--local"])
    report = json.loads((tmp_path / "moe" / REPORT_NAME).read_text())
    assert report["probe"]["max_abs_logit_diff"] < 1e-5
    assert load_config(tmp_path / "moe").moe is not None


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_runs_as_ray_task(ray_cluster: None, dense_dir: Path, tmp_path: Path) -> None:
    scale_out.main(["--src", str(dense_dir), "--dst", str(tmp_path / "moe"), "--num-experts", "4", "--no-probe"])
    assert load_config(tmp_path / "moe").moe.num_experts == 4  # type: ignore[union-attr]
    assert "probe" not in json.loads((tmp_path / "moe" / REPORT_NAME).read_text())

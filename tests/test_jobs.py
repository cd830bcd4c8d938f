"""Every job that takes a config rejects an unknown ``--set`` field before any work, naming the field and the
valid ones; a job without a config offers no ``--config``/``--set`` (so they cannot be silently ignored)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from aquila_ray.checkpoint import save_model
from aquila_ray.config import get_preset
from aquila_ray.errors import ConfigError
from aquila_ray.model import build_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "tiny"
    save_model(build_model(get_preset("tiny")), path)
    return path


# job -> (its arguments besides --set, the config class its error names)
CONFIG_JOBS = {
    "train": (["--storage-path", "{tmp}/runs", "--run-name", "x"], "TrainConfig"),
    "efficientscale": (["--output", "{tmp}/es"], "RecipeConfig"),
    "prepare_data": (["--output", "{tmp}/data"], "DataConfig"),
    "train_tokenizer": (["--output", "{tmp}/tok"], "DataConfig"),
    "scale_up": (["--src", "{ckpt}", "--dst", "{tmp}/up"], "ScaleUpConfig"),
    "scale_out": (["--src", "{ckpt}", "--dst", "{tmp}/out"], "ModelConfig"),
}


@pytest.mark.parametrize("job", sorted(CONFIG_JOBS))
def test_unknown_set_field_is_refused_by_name(job: str, ckpt: Path, tmp_path: Path) -> None:
    args, cls = CONFIG_JOBS[job]
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args] + ["--set", "no_such_field=1", "--dry-run"]
    with pytest.raises(ConfigError, match=rf"unknown field\(s\) \['no_such_field'\] for {cls}; valid fields: \["):
        importlib.import_module(f"jobs.{job}").main(argv)
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize("job,args", [("convert_hf", ["to-hf", "{ckpt}", "{tmp}/hf"]),
                                      ("evaluate", ["--ckpt", "{ckpt}"]),
                                      ("export_checkpoint", ["{ckpt}", "--output", "{tmp}/out"]),
                                      ("lm_eval", ["{ckpt}", "--tasks", "arc_easy"])])
def test_jobs_without_a_config_offer_no_set(job: str, args: list[str], ckpt: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args] + ["--set", "x=1"]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"jobs.{job}").main(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments: --set x=1" in capsys.readouterr().err

"""The data job with its inputs and its output on S3: the planted corpus' exact counts, shards that decode back
to the clean text, the trainer's reader on the S3 shards, a no-op rerun and a crash finished by a rerun.

S3 is the one stand-in: no cloud is reachable here, so an S3 protocol server runs in this process (moto's
``ThreadedMotoServer``, over HTTP on localhost). Everything else is real: pyarrow's S3 filesystem on the
driver and on every Ray worker, Ray Data reading and writing ``s3://`` URIs, and the trainer's shard
reader. The endpoint and the credentials reach the workers as the standard ``AWS_*`` environment
variables, so the URIs are the ones a user writes (``s3://bucket/run``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from aquila_ray.data.dataset import TokenDataset
from aquila_ray.data.shards import read_manifest
from data_pipeline.config import load_data_config
from data_pipeline.output import Output
from data_pipeline.run import prepare_data
from data_pipeline.synthetic import Planted, make_planted_corpus
from jobs import prepare_data as prepare_data_job

pytestmark = pytest.mark.ray
BUCKET = "aquila"


@pytest.fixture(scope="module")
def s3() -> Any:
    """An S3 endpoint with an empty bucket; ``AWS_*`` variables point every process at it."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield fs
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def ray_cluster(s3: Any, ray_cluster: Any) -> Any:
    """The shared cluster, started after ``s3`` so its workers inherit the endpoint."""
    return ray_cluster


def upload(fs: pafs.FileSystem, local: Path, key: str) -> None:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        with fs.open_output_stream(f"{BUCKET}/{key}/{f.relative_to(local).as_posix()}", compression=None) as out:
            out.write(f.read_bytes())


# near dedup off: its shuffles cost time and write nothing the exact dedup does not (tested elsewhere)
OVERRIDES = ["tokenizer.vocab_size=400", "pack.seq_len=32", "mix.validation_fraction=0.1", "language.min_score=0.5",
             "domain.blocked_domains=[spam.example]", "dedup.fuzzy=false", "shuffle_partitions=2"]


def config(inputs: list[str], output: str):
    return load_data_config(None, OVERRIDES, inputs=inputs, output=output)


@dataclass
class Run:
    planted: Planted
    uri: str  # prepared from s3://aquila/corpus/ (the planted corpus, uploaded)
    inputs: list[str]


@pytest.fixture(scope="module")
def run(s3: Any, ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("corpus")
    planted = make_planted_corpus(root, seed=3, num_en=12, num_zh=12)
    upload(s3, root, "corpus")
    inputs = [spec.replace(f"{root}/", f"s3://{BUCKET}/corpus/") for spec in planted.inputs]
    uri = f"s3://{BUCKET}/run"
    assert prepare_data(config(inputs, uri)) == uri
    return Run(planted, uri, inputs)


def test_s3_run_counts_every_planted_record(run: Run) -> None:
    """The exact per-reason counts of the planted corpus (near dedup off: its planted copies are kept)."""
    out, p = Output(run.uri), run.planted
    stats = json.loads(out.read_text("stats.json"))
    expected = {r: n for r, n in p.reasons.items() if r != "dedup.near"}
    found = {}
    for step in stats["steps"]:
        found.update(step.get("dropped", {}))
        found.update(step.get("invalid", {}))
    assert found == expected
    assert stats["total"]["in"] == p.total and stats["total"]["kept"] == p.kept + p.reasons["dedup.near"]
    rejected = pq.read_table(out.path("rejected"), filesystem=out.fs).column("reason").to_pylist()
    assert {r: rejected.count(r) for r in set(rejected)} == expected
    # nothing half-written is left behind: no temp object anywhere under the output
    keys = [i.path for i in out.fs.get_file_info(pafs.FileSelector(out.path(), recursive=True))]
    assert keys and not [k for k in keys if ".tmp" in k]


def test_s3_shards_decode_back_to_the_clean_text(run: Run) -> None:
    out = Output(run.uri)
    m = read_manifest(run.uri)
    tok = Tokenizer.from_str(out.read_text("tokenizer.json"))
    assert m.eos_token_id == tok.token_to_id("<|endoftext|>")
    clean = pq.read_table(out.path("clean"), filesystem=out.fs).to_pydict()
    for split in ("train", "validation"):
        docs = []
        for info in m.splits[split].files:
            with out.fs.open_input_file(out.path(info.path)) as f:
                rows = pa.ipc.open_file(f).read_all().column(0).combine_chunks().flatten().to_numpy()
            stream = rows.tolist()
            cut = [i for i, t in enumerate(stream) if t == m.eos_token_id]
            docs += [tok.decode(stream[a:b]) for a, b in zip([0] + [i + 1 for i in cut], cut, strict=False) if b > a]
        assert sorted(docs) == sorted(t for t, s in zip(clean["text"], clean["split"], strict=True) if s == split)
        assert m.splits[split].num_sequences > 0


def test_trainer_reads_the_shards_from_s3(run: Run) -> None:
    out, m = Output(run.uri), read_manifest(run.uri)
    remote = TokenDataset(run.uri, "train")
    assert len(remote) == m.splits["train"].num_sequences > 0
    assert not remote._reader(0).memory_mapped  # fetched by record batch over S3, not mapped
    expected = []
    for info in m.splits["train"].files:
        with out.fs.open_input_file(out.path(info.path)) as f:
            col = pa.ipc.open_file(f).read_all().column(0).combine_chunks()
        expected.append(col.flatten().to_numpy().reshape(len(col), m.seq_len + 1))
    every = np.arange(len(remote))[::-1]
    assert np.array_equal(remote.get(every), np.concatenate(expected)[every])


def test_training_with_storage_on_s3_reports_its_curves(run: Run, s3: Any, tmp_path: Path) -> None:
    """A run whose storage path is S3: rank 0 uploads its metric rows with every checkpoint and its W&B
    directory at the end, so the driver reads the curve from S3 (rank 0's local directory is elsewhere),
    and the checkpoint carries the data's tokenizer. The worker dies after the step-2 checkpoint and the
    restarted one resumes from S3 in place (byte ranges, no download) and finishes on the same losses as
    a run that never stopped."""
    from aquila_ray.config.train import build_train_config
    from aquila_ray.train import run_training
    from aquila_ray.train.metrics import read_run_metrics, read_wandb_history

    name = f"s3-run-{uuid.uuid4().hex[:8]}"  # rank 0's local copy lives under ~/aquila_ray_runs/NAME
    cfg = build_train_config({"model": "tiny", "data_dir": run.uri},
                             ["global_batch_tokens=256", "micro_batch_size=4", "steps=3", "checkpoint.every=2",
                              "eval_every=-1", "scaling.num_workers=1", "scaling.max_failures=1",
                              "wandb.mode=offline", "fault_injection=0@3"])
    result = run_training(cfg, f"s3://{BUCKET}/runs", name)
    assert result.run_dir == f"s3://{BUCKET}/runs/{name}"
    rows = read_run_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and result.metrics["step"] == 3
    marker = Path.home() / "aquila_ray_runs" / name / "fault_injection-rank0-step3.json"
    killed_at = json.loads(marker.read_text())["time"]
    assert [r["step"] for r in rows if r["time"] < killed_at] == [1, 2]  # step 3 ran after the resume
    unbroken = run_training(dataclasses.replace(cfg, fault_injection=None), str(tmp_path / "runs"), "unbroken")
    assert [r["loss"] for r in read_run_metrics(unbroken.run_dir)] == [r["loss"] for r in rows]
    parts = s3.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/{name}/metrics"))
    assert sorted(i.base_name for i in parts) == ["steps-000000001-000000002.jsonl", "steps-000000003-000000003.jsonl"]
    wandb_files = [i.path for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/{name}/wandb", recursive=True))
                   if i.path.endswith(".wandb")]
    assert len(wandb_files) == 2  # one offline W&B directory per (re)start, both uploaded
    histories = []
    for i, path in enumerate(wandb_files):
        local = tmp_path / f"run-{i}.wandb"
        local.write_bytes(s3.open_input_stream(path).read())
        histories.append([h["step"] for h in read_wandb_history(local)])
    # the resumed attempt logged step 3; the killed one logged 1-2, of which W&B keeps what it had flushed
    assert [3] in histories and histories[1 - histories.index([3])] in ([], [1], [1, 2])
    ckpt = result.checkpoint_path
    assert s3.get_file_info(f"{ckpt}/tokenizer.json").is_file  # the data's tokenizer travels with the model
    shutil.rmtree(Path.home() / "aquila_ray_runs" / name, ignore_errors=True)


def test_rerun_on_s3_is_a_noop_and_a_crash_is_finished(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    out = Output(run.uri)
    done, manifest = out.read_bytes("_SUCCESS"), out.read_bytes("manifest.json")
    prepare_data(config(run.inputs, run.uri))
    assert out.read_bytes("_SUCCESS") == done
    # the job a user runs, on the finished S3 output: returns at once and prints the totals read from S3
    args = ["--output", run.uri] + [a for i in run.inputs for a in ("--input", i)]
    assert prepare_data_job.main(args + [a for o in OVERRIDES for a in ("--set", o)]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == json.loads(out.read_text("stats.json"))["total"]
    assert out.read_bytes("_SUCCESS") == done
    # a crash in the tokens stage: no manifest, no success marker, one shard and one tokenized part gone
    shard = sorted(rel for _, rel in out.parts("tokens/train", suffix=".arrow"))[0]
    expected = out.read_bytes(shard)
    for rel in ("_SUCCESS", "manifest.json", shard, "_work/tokenized/part-00000.parquet"):
        out.remove(rel)
    prepare_data(config(run.inputs, run.uri))
    assert out.read_bytes(shard) == expected and out.read_bytes("manifest.json") == manifest

"""Checkpoints: bit-identical round trips, and a clear CheckpointError for every kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import aquila_ray
from aquila_ray.checkpoint import INDEX_NAME, CheckpointReader, load_state_dict, save_checkpoint, save_model
from aquila_ray.config import apply_overrides, get_preset
from aquila_ray.errors import CheckpointError
from aquila_ray.model import build_model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = build_model(get_preset("tiny"), seed=0)
    return save_model(model, tmp_path / "ckpt", max_shard_bytes=60_000), model


def test_round_trip_is_bit_identical_sharded_and_single(tmp_path: Path, saved) -> None:
    path, model = saved
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sd, cfg = load_state_dict(path)
    assert cfg == model.config
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    single = save_model(model, tmp_path / "single")
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    loaded = aquila_ray.load_model(str(single))
    x = torch.randint(0, 512, (2, 9))
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)


def test_tied_embeddings_stored_once(tmp_path: Path) -> None:
    cfg = apply_overrides(get_preset("tiny"), ["tie_embeddings=true"])
    model = build_model(cfg, seed=0)
    path = save_model(model, tmp_path / "tied")
    assert "lm_head.weight" not in CheckpointReader(path).keys()
    loaded = aquila_ray.load_model(str(path))
    assert loaded.lm_head.weight is loaded.embed.weight
    x = torch.randint(0, 512, (1, 5))
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)


def test_truncated_shard(saved) -> None:
    path, _ = saved
    shard = next(path.glob("model-00002-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model-00002-of-.* has \d+ bytes, the index says \d+: truncated"):
        load_state_dict(path)


def _flip_last_byte(path: Path, shard_no: int) -> None:
    """Corrupt shard ``shard_no`` of the checkpoint at ``path`` without changing its size."""
    shard = next(path.glob(f"model-{shard_no:05d}-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_tampered_shard(saved) -> None:
    path, _ = saved
    _flip_last_byte(path, 1)
    with pytest.raises(CheckpointError, match=r"model-00001-of-.* fails its BLAKE3 check: the file was modified"):
        load_state_dict(path)
    assert load_state_dict(path, verify=False)[0]  # sizes only


def test_format_1_checkpoints_with_sha256_still_verify(saved) -> None:
    """Checkpoints written before format aquila-ray/2 list SHA-256 digests; the reader checks those."""
    import hashlib

    path, model = saved
    index = json.loads((path / INDEX_NAME).read_text())
    index["metadata"]["format"] = "aquila-ray/1"
    for name, meta in index["metadata"]["files"].items():
        del meta["blake3"]
        meta["sha256"] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / INDEX_NAME).write_text(json.dumps(index))
    sd, _ = load_state_dict(path)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    _flip_last_byte(path, 2)
    with pytest.raises(CheckpointError, match=r"model-00002-of-.* fails its SHA-256 check"):
        load_state_dict(path)
    for meta in index["metadata"]["files"].values():
        del meta["sha256"]
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lists no digest for model-0000\d-of-.* \(expected one of "
                                              r"\['blake3', 'sha256'\]\); load it with verify=False"):
        load_state_dict(path)


def test_missing_shard_and_missing_index(saved) -> None:
    path, _ = saved
    next(path.glob("model-00003-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"shard .*model-00003-of-.* listed in the index is missing"):
        load_state_dict(path)
    (path / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json is missing: the checkpoint is incomplete"):
        load_state_dict(path)


def test_config_that_does_not_match_weights(saved) -> None:
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not match its config.json: .*shape mismatch.*mlp"):
        load_state_dict(path)
    cfg["num_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing \d+ tensor\(s\), e.g. \['layers.2"):
        load_state_dict(path)


def test_pickle_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"holds pickle weights \['pytorch_model.bin'\]; aquila-ray never loads"):
        load_state_dict(d)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_state_dict(tmp_path / "nowhere")


def test_failed_write_leaves_previous_checkpoint_intact(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    path, model = saved
    bad = dict(model.state_dict())
    bad.pop("norm.weight")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\), e.g. \['norm.weight'\]"):
        save_checkpoint(path, bad, model.config)

    from aquila_ray.checkpoint.io import CheckpointWriter

    real_add, calls = CheckpointWriter.add, []

    def add_then_fail(self, name, tensor):  # the disk fills up after some shards are written
        calls.append(name)
        if len(calls) == 12:
            raise OSError("disk full")
        real_add(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "add", add_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {k: v * 2 for k, v in model.state_dict().items()}, model.config, max_shard_bytes=10_000)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temporary directory left
    sd, _ = load_state_dict(path)
    assert torch.equal(sd["norm.weight"], model.state_dict()["norm.weight"])


def test_shard_error_on_the_writer_thread_reaches_the_caller(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards are written on a background thread; its error surfaces in save_checkpoint and nothing is left."""
    import aquila_ray.checkpoint.io as io

    path, model = saved
    real_save, calls = io.save_file, []

    def save_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(io, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(path, {k: v * 2 for k, v in model.state_dict().items()}, model.config, max_shard_bytes=10_000)
    assert len(calls) == 3  # the writer stopped at the failed shard
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]
    sd, _ = load_state_dict(path)
    assert torch.equal(sd["norm.weight"], model.state_dict()["norm.weight"])


def test_index_digests_are_the_files_blake3_for_every_dtype(tmp_path: Path) -> None:
    """The writer hashes shards from memory; the index must still hold each file's real BLAKE3 digest."""
    import blake3

    from aquila_ray.checkpoint.io import CheckpointWriter, _digest_written

    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(33, 7, generator=gen), "b": torch.randn(5, generator=gen).to(torch.bfloat16),
               "c": torch.tensor(True), "d": torch.empty(0, 4), "e": torch.arange(9), "f": torch.randn(3).half(),
               "g": torch.tensor(2.5, dtype=torch.float64), "h": torch.randn(4, 6, generator=gen).t()}
    with CheckpointWriter(tmp_path / "c", get_preset("tiny"), max_shard_bytes=600) as writer:
        for k, t in tensors.items():
            writer.add(k, t)
    index = json.loads((tmp_path / "c" / INDEX_NAME).read_text())
    files = index["metadata"]["files"]
    assert len(files) > 1
    for name, meta in files.items():
        assert meta["blake3"] == blake3.blake3((tmp_path / "c" / name).read_bytes()).hexdigest()
    reader = CheckpointReader(tmp_path / "c")
    for k, t in tensors.items():
        assert torch.equal(reader.get(k), t)
    # a layout it does not expect (here: the wrong tensors for the file) falls back to reading the file
    one = next(iter(files))
    assert _digest_written(tmp_path / "c" / one, {k: torch.zeros(1) for k in tensors}) == files[one]["blake3"]


def test_writer_closes_once(tmp_path: Path) -> None:
    from aquila_ray.checkpoint.io import CheckpointWriter

    writer = CheckpointWriter(tmp_path / "c", {"note": "x"})
    writer.add("a", torch.ones(2))
    writer.close()
    with pytest.raises(CheckpointError, match="already closed"):
        writer.close()


def test_meta_model_build_does_not_import_dynamo() -> None:
    """Checkpoint checks build the model on the meta device; that must not pull in torch._dynamo (~2 s)."""
    import subprocess
    import sys

    code = ("import sys; from aquila_ray.checkpoint.io import _model_keys; from aquila_ray.config import get_preset;"
            "_model_keys(get_preset('tiny-moe')); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False"

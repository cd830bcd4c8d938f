"""Export our checkpoints to Hugging Face format and import HF models, tensor by tensor.

Both directions stream through safetensors (one tensor in memory at a time plus one output shard), so
a 100 GB model converts on a node with far less memory. Files written load with
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` offline; transformers is not needed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from aquila_ray.checkpoint import CheckpointReader, CheckpointWriter, atomic_directory
from aquila_ray.checkpoint.io import DEFAULT_SHARD_BYTES, PICKLE_SUFFIXES, _check_keys, _model_keys
from aquila_ray.config import ModelConfig, apply_overrides, from_dict
from aquila_ray.errors import ConfigError, ConversionError
from aquila_ray.hf.architectures import HFArchitecture
from aquila_ray.hf.registry import ARCHITECTURES
from aquila_ray.hf.tokenizer import TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, hf_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not valid; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def pick_architecture(cfg: ModelConfig, name: str | None = None) -> HFArchitecture:
    """The named architecture (checked to fit), or the first registered one our model fits."""
    if name is not None:
        if name not in ARCHITECTURES:
            raise ConfigError(f"arch={name!r} is not valid; choose one of {sorted(ARCHITECTURES)}")
        reason = ARCHITECTURES[name].fits(cfg)
        if reason:
            raise ConversionError(f"the model cannot be exported as {name}: {reason}")
        return ARCHITECTURES[name]
    reasons = {}
    for arch in ARCHITECTURES.values():
        reason = arch.fits(cfg)
        if reason is None:
            return arch
        reasons[arch.name] = reason
    raise ConversionError(f"no Hugging Face architecture fits this model: {reasons}")


def hf_config(cfg: ModelConfig, arch: HFArchitecture, dtype: torch.dtype) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": [arch.architecture], "model_type": arch.model_type}
    for ours, theirs in arch.fields.items():
        value: Any = cfg
        for part in ours.split("."):
            value = getattr(value, part)
        out[theirs] = value
    out["rope_theta"] = cfg.rope_theta  # transformers < 5 reads this
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}  # transformers >= 5
    out["head_dim"] = cfg.head_dim
    out.update(arch.constants)
    out.update(arch.export_config(cfg))
    name = str(dtype).removeprefix("torch.")
    out["torch_dtype"] = out["dtype"] = name
    return out


def export_hf(ckpt_dir: str | Path, hf_dir: str | Path, arch: str | None = None, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | Path | None = None) -> Path:
    """Write ``hf_dir`` (config.json + safetensors, and the tokenizer files) from our checkpoint; returns
    hf_dir. The tokenizer: ``tokenizer`` (a tokenizers ``tokenizer.json``), else the one the checkpoint
    carries (the trainer puts its data's tokenizer into every checkpoint), else none (AutoTokenizer then
    needs ``tokenizer``)."""
    reader = CheckpointReader(ckpt_dir)
    reader.check_matches_config()
    cfg = reader.config
    spec = pick_architecture(cfg, arch)
    out_dtype = _dtype(dtype) or reader.get(reader.keys()[0]).dtype
    carried, carried_config = Path(ckpt_dir) / TOKENIZER_NAME, Path(ckpt_dir) / TOKENIZER_CONFIG_NAME
    source = Path(tokenizer) if tokenizer is not None else carried if carried.is_file() else None
    tok = None
    if source is not None:
        if not source.is_file():
            raise ConversionError(f"tokenizer {source} does not exist; pass a tokenizers tokenizer.json (the data "
                                  f"job writes one next to its token shards)")
        # a tokenizer the checkpoint carries keeps the EOS the trainer chose
        eos = json.loads(carried_config.read_text()).get("eos_token") if (
            tokenizer is None and carried_config.is_file()) else None
        tok = hf_tokenizer(source.read_bytes(), cfg.max_seq_len, source=str(source), eos_token=eos)
    config = hf_config(cfg, spec, out_dtype)
    with atomic_directory(hf_dir) as tmp:
        if tok is not None:
            tok.write(tmp)
            config.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        with CheckpointWriter(tmp, config, max_shard_bytes) as writer:
            for key in sorted(reader.keys()):
                writer.add(spec.keys.to_hf(key), reader.get(key).to(out_dtype))
            for key, tensor in spec.export_tensors(cfg, out_dtype).items():
                writer.add(key, tensor)
    return Path(hf_dir)


def _hf_tensor_files(hf_dir: Path) -> dict[str, Path]:
    """HF key -> file, for single-file or sharded safetensors; pickle is refused."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: hf_dir / f for k, f in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as h:
            return dict.fromkeys(h.keys(), single)
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in PICKLE_SUFFIXES) if hf_dir.is_dir() else []
    if pickles:
        raise ConversionError(
            f"{hf_dir} holds only pickle weights {pickles[:3]}; aquila-ray does not unpickle (it can run "
            f"arbitrary code). Re-save with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise ConversionError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")


def config_from_hf(hf: dict[str, Any]) -> tuple[ModelConfig, HFArchitecture]:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"model_type={model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    for key, value in arch.constants.items():
        if key in hf and hf[key] not in (value, None):
            raise ConversionError(f"{arch.architecture} with {key}={hf[key]!r} cannot be converted "
                                  f"(aquila-ray needs {key}={value!r})")
    data: dict[str, Any] = {}
    for ours, theirs in arch.fields.items():
        if theirs in hf and hf[theirs] is not None:
            data[ours] = hf[theirs]
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ConversionError(f"RoPE scaling {rope or hf.get('rope_scaling')} is not supported (plain RoPE only)")
    data["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    hd = hf.get("head_dim")
    if hd is not None and hd != hf["hidden_size"] // hf["num_attention_heads"]:
        raise ConversionError(f"head_dim={hd} differs from hidden_size / num_attention_heads; not supported")
    nested = arch.import_config(hf)
    top = {k: v for k, v in data.items() if "." not in k}
    try:
        cfg = from_dict(ModelConfig, top)
        if nested:
            cfg = apply_overrides(cfg, nested)
    except ConfigError as e:
        raise ConversionError(f"the Hugging Face config does not give a valid model: {e}") from e
    return cfg, arch


def import_hf(hf_dir: str | Path, ckpt_dir: str | Path, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write our checkpoint at ``ckpt_dir`` from a Hugging Face model directory; returns ckpt_dir."""
    hf_path = Path(hf_dir)
    cfg_path = hf_path / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{cfg_path} is missing; expected a Hugging Face model directory")
    cfg, arch = config_from_hf(json.loads(cfg_path.read_text()))
    files = _hf_tensor_files(hf_path)
    out_dtype = _dtype(dtype)
    handles: dict[Path, Any] = {}

    def tensor(key: str) -> torch.Tensor:
        f = files[key]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(key)

    ours: dict[str, str] = {}  # our key -> HF key
    for key in files:
        name = arch.keys.from_hf(key)
        if name is None or (cfg.tie_embeddings and name == "lm_head.weight"):
            reason = None if name else arch.import_unmapped(key, tensor(key))
            if reason:
                raise ConversionError(f"{hf_path}: {reason}")
            continue
        ours[name] = key
    shapes = {}
    for name, key in ours.items():
        f = files[key]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        shapes[name] = tuple(handles[f].get_slice(key).get_shape())
    _check_keys(ours.keys(), shapes, _model_keys(cfg), f"Hugging Face model {hf_path}")
    with atomic_directory(ckpt_dir) as tmp:
        with CheckpointWriter(tmp, cfg, max_shard_bytes) as writer:
            for name in sorted(ours):
                t = tensor(ours[name])
                writer.add(name, t.to(out_dtype) if out_dtype else t)
    return Path(ckpt_dir)

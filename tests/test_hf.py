"""Hugging Face interop: logits parity with transformers' Qwen2 / Llama, both directions, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aquila_ray
from aquila_ray.errors import ConversionError
from aquila_ray.hf import export_hf, import_hf
from aquila_ray.hf.architectures import QWEN2

transformers = pytest.importorskip("transformers")


def _random_qwen2(heads: int, kv: int, tie: bool, hidden_per_head: int = 6, inter: int = 37) -> torch.nn.Module:
    cfg = transformers.Qwen2Config(
        vocab_size=301, hidden_size=heads * hidden_per_head, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, rope_theta=10_000.0, tie_word_embeddings=tie,
        max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(heads * 10 + kv)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # biases and norms too, so every mapping matters
    return model


@pytest.mark.parametrize(("heads", "kv", "tie"), [(4, 4, False), (8, 4, True), (8, 2, False), (12, 3, True)])
def test_qwen2_round_trip_logits(tmp_path: Path, heads: int, kv: int, tie: bool) -> None:
    hf = _random_qwen2(heads, kv, tie)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = aquila_ray.load_model(str(tmp_path / "ckpt"))
    assert ours.config.kv_group_size == heads // kv and ours.config.tie_embeddings == tie
    x = torch.randint(0, 301, (2, 19))
    with torch.no_grad():
        reference = hf(x).logits
        assert (ours(x).logits - reference).abs().max() < 1e-5
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert (again(x).logits - reference).abs().max() < 1e-5


def test_llama_without_bias_and_sharded_export(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=50, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = aquila_ray.load_model(str(tmp_path / "ckpt"))
    assert not ours.config.qkv_bias
    x = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max() < 1e-5
    export_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_bytes=20_000)
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert (again(x).logits - hf(x).logits).abs().max() < 1e-5


def test_key_map_reverse_is_derived() -> None:
    keys = QWEN2.keys
    assert keys.to_hf("layers.12.attn.q_proj.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert keys.from_hf("model.layers.3.post_attention_layernorm.weight") == "layers.3.mlp_norm.weight"
    assert keys.from_hf("model.layers.3.mlp.shared_expert.up_proj.weight") is None
    with pytest.raises(ConversionError, match=r"no Hugging Face name for our tensor 'layers.0.foo'"):
        keys.to_hf("layers.0.foo")


def test_import_errors(tmp_path: Path) -> None:
    hf = _random_qwen2(4, 2, False)
    hf.save_pretrained(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ConversionError, match=r"hidden_act='gelu' cannot be converted \(aquila-ray needs hidden_act="):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConversionError, match=r"model_type='gpt2' is not supported; supported: \["):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"holds only pickle weights \['pytorch_model.bin'\]"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_convert_job_cli(tmp_path: Path) -> None:
    _random_qwen2(4, 2, False).save_pretrained(tmp_path / "hf")
    run = [sys.executable, "-m", "jobs.convert_hf"]
    dry = subprocess.run([*run, "--dry-run", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ck")],
                         capture_output=True, text=True, check=True)
    assert '"architecture": "Qwen2ForCausalLM"' in dry.stdout and not (tmp_path / "ck").exists()
    subprocess.run([*run, "from-hf", str(tmp_path / "hf"), str(tmp_path / "ck")], check=True, capture_output=True)
    out = subprocess.run([*run, "to-hf", str(tmp_path / "ck"), str(tmp_path / "hf2"), "--dtype", "bfloat16"],
                         capture_output=True, text=True, check=True)
    assert "Qwen2ForCausalLM" in out.stdout
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bad = subprocess.run([*run, "to-hf", str(tmp_path / "nope"), str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "CheckpointError" in bad.stderr and "does not exist" in bad.stderr


def test_export_writes_the_tokenizer_autotokenizer_opens(tmp_path: Path) -> None:
    """to-hf writes tokenizer.json + tokenizer_config.json (eos, pad) from --tokenizer, or from the checkpoint
    (the trainer stores its data's tokenizer there); AutoTokenizer then encodes exactly as ours."""
    from tokenizers import Tokenizer

    from aquila_ray.hf.tokenizer import hf_tokenizer
    from data_pipeline.config import TokenizerConfig
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    text = (Path(torch.__file__).parent / "functional.py").read_text()[:40_000].splitlines()  # real prose + code
    tok = train_tokenizer(text, TokenizerConfig(vocab_size=400))
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    _random_qwen2(4, 2, False).save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "hf2", tokenizer=tmp_path / "tokenizer.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    sample = "def forward(self, x): return torch.relu(x)  # 中文 too"
    assert hf_tok(sample)["input_ids"] == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(sample).ids
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1)
    # carried by the checkpoint (what the trainer writes): exported without --tokenizer
    hf_tokenizer((tmp_path / "tokenizer.json").read_bytes(), 64, eos_token_id=0).write(tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "hf3")
    carried = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf3")
    assert carried(sample)["input_ids"] == hf_tok(sample)["input_ids"]
    with pytest.raises(ConversionError, match=r"tokenizer .*nope.json does not exist"):
        export_hf(tmp_path / "ck", tmp_path / "hf5", tokenizer=tmp_path / "nope.json")
    with pytest.raises(ConversionError, match="is not a tokenizers tokenizer.json"):
        export_hf(tmp_path / "ck", tmp_path / "hf4", tokenizer=tmp_path / "hf2" / "config.json")

"""The tokenizer files that make a checkpoint directory open with ``transformers.AutoTokenizer``.

aquila-ray's tokenizer is a ``tokenizers`` ``tokenizer.json`` (the data job writes it next to the token
shards, and its manifest records the EOS id). ``write_hf_tokenizer`` copies it into a model directory and
writes ``tokenizer_config.json`` (``PreTrainedTokenizerFast`` with eos and pad), which is all
``AutoTokenizer.from_pretrained``, lm-eval's ``hf`` model and vLLM read. The trainer does this for every
model export (the tokenizer of its data), so ``jobs.convert_hf to-hf`` finds it in the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from aquila_ray.errors import ConversionError

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
"""The special tokens the data job's tokenizer is trained with (data_pipeline.config.TokenizerConfig)."""


def hf_tokenizer_files(tokenizer_json: bytes, model_max_length: int, eos_token_id: int | None = None,
                       source: str = "tokenizer.json") -> dict[str, bytes]:
    """The two files (name -> content) for a tokenizers ``tokenizer.json``: itself and its
    ``tokenizer_config.json``. EOS: the token of ``eos_token_id`` (a data manifest's), else
    ``<|endoftext|>``; pad: ``<|pad|>`` when the vocabulary has it, else EOS. ConversionError when the file
    is not a tokenizer or has no EOS (``source`` names it)."""
    try:
        tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # the Rust error says what is wrong with the file
        raise ConversionError(f"{source} is not a tokenizers tokenizer.json: {e}") from e
    eos = tok.id_to_token(eos_token_id) if eos_token_id is not None else EOS_TOKEN
    if eos is None or tok.token_to_id(eos) is None:
        raise ConversionError(f"{source} has no EOS token (eos_token_id={eos_token_id}, or {EOS_TOKEN!r}); it is "
                              f"not the tokenizer aquila-ray's data job trains")
    pad = PAD_TOKEN if tok.token_to_id(PAD_TOKEN) is not None else eos
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad, "bos_token": None,
              "unk_token": None, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False}
    return {TOKENIZER_NAME: tokenizer_json, TOKENIZER_CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode()}


def write_hf_tokenizer(tokenizer_json: str | Path, out_dir: str | Path, model_max_length: int,
                       eos_token_id: int | None = None) -> dict[str, str]:
    """Write ``hf_tokenizer_files`` of the file ``tokenizer_json`` into ``out_dir``; returns the eos and pad
    tokens written."""
    src = Path(tokenizer_json)
    if not src.is_file():
        raise ConversionError(f"tokenizer {src} does not exist; pass a tokenizers tokenizer.json (the data job "
                              f"writes one next to its token shards)")
    files = hf_tokenizer_files(src.read_bytes(), model_max_length, eos_token_id, str(src))
    for name, content in files.items():
        (Path(out_dir) / name).write_bytes(content)
    config = json.loads(files[TOKENIZER_CONFIG_NAME])
    return {"eos_token": config["eos_token"], "pad_token": config["pad_token"]}


__all__ = ["TOKENIZER_CONFIG_NAME", "TOKENIZER_NAME", "hf_tokenizer_files", "write_hf_tokenizer"]

"""The tokenizer files that make a checkpoint directory open with ``transformers.AutoTokenizer``.

aquila-ray's tokenizer is a ``tokenizers`` ``tokenizer.json`` (the data job writes it next to the token
shards, and its manifest records the EOS id). ``hf_tokenizer`` pairs it with a
``tokenizer_config.json`` (``PreTrainedTokenizerFast`` with eos and pad), which is all
``AutoTokenizer.from_pretrained``, lm-eval's ``hf`` model and vLLM read. The trainer does this for every
model export (the tokenizer of its data), so ``jobs.convert_hf to-hf`` finds it in the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from aquila_ray.errors import ConversionError

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
"""The special tokens the data job's tokenizer is trained with (data_pipeline.config.TokenizerConfig)."""


@dataclass(frozen=True)
class HFTokenizer:
    """A tokenizer's Hugging Face files and the ids its model config names."""

    files: dict[str, bytes]
    """``tokenizer.json`` and ``tokenizer_config.json``, by name."""
    eos_token_id: int
    pad_token_id: int

    def write(self, directory: str | Path) -> None:
        for name, content in self.files.items():
            (Path(directory) / name).write_bytes(content)


def hf_tokenizer(tokenizer_json: bytes, model_max_length: int, eos_token_id: int | None = None,
                 source: str = "tokenizer.json", eos_token: str | None = None) -> HFTokenizer:
    """The Hugging Face files of a tokenizers ``tokenizer.json``: itself and its ``tokenizer_config.json``.
    EOS: ``eos_token``, else the token of ``eos_token_id`` (a data manifest's), else ``<|endoftext|>``; pad:
    ``<|pad|>`` when the vocabulary has it, else EOS. ConversionError when the file is not a tokenizer or has
    no such EOS (``source`` names it)."""
    try:
        tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # the Rust error says what is wrong with the file
        raise ConversionError(f"{source} is not a tokenizers tokenizer.json: {e}") from e
    eos = eos_token or (tok.id_to_token(eos_token_id) if eos_token_id is not None else EOS_TOKEN)
    eos_id = tok.token_to_id(eos) if eos is not None else None
    if eos is None or eos_id is None:
        raise ConversionError(f"{source} has no EOS token (eos_token_id={eos_token_id}, or "
                              f"{eos_token or EOS_TOKEN!r}); it is not the tokenizer aquila-ray's data job trains")
    pad_id = tok.token_to_id(PAD_TOKEN)
    pad = PAD_TOKEN if pad_id is not None else eos
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad, "bos_token": None,
              "unk_token": None, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False}
    return HFTokenizer(files={TOKENIZER_NAME: tokenizer_json,
                              TOKENIZER_CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode()},
                       eos_token_id=eos_id, pad_token_id=pad_id if pad_id is not None else eos_id)


__all__ = ["TOKENIZER_CONFIG_NAME", "TOKENIZER_NAME", "HFTokenizer", "hf_tokenizer"]

"""Measuring function preservation: logits and loss of a model on a seeded probe batch, one block at a time.

The forward runs block by block from a tensor getter (a state dict, a checkpoint reader, or the tensors a
growth just produced), so a 100 GB checkpoint is probed with one block in memory. It runs in float64 with
float64 RMSNorm (``Fp64RMSNorm``): the model's RMSNorm computes in float32 like Qwen2/LLaMA, which would
hide FPI's exactness (~1e-13, see the Net2Net / bert2BERT function-preservation claim) behind ~1e-7 noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aquila_ray.config import ModelConfig
from aquila_ray.growth.transform import layer_suffixes
from aquila_ray.model.model import Block, RMSNorm, rope_cos_sin


class Fp64RMSNorm(RMSNorm):
    """RMSNorm computed in the input's dtype when it is wider than float32 (float64 checks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(dtype)
        xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xc.to(x.dtype)


def use_fp64_norms(model: nn.Module) -> nn.Module:
    """Swap every RMSNorm of an evaluation model for ``Fp64RMSNorm`` (same weights); returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is RMSNorm:
                norm = Fp64RMSNorm(child.weight.shape[0], child.eps)
                norm.weight = child.weight
                setattr(module, name, norm)
    return model


def probe_tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(batch, min(seq_len, max_seq_len) + 1) seeded random token ids: inputs ``[:, :-1]``, labels ``[:, 1:]``."""
    t = min(seq_len, cfg.max_seq_len)
    return torch.randint(0, cfg.vocab_size, (batch, t + 1), generator=torch.Generator().manual_seed(seed))


@dataclass
class ProbeForward:
    """A block-by-block float64 forward on fixed tokens: ``embed``, ``block`` per layer, then ``finish``."""

    cfg: ModelConfig
    tokens: torch.Tensor
    """(B, T + 1) probe tokens from ``probe_tokens``."""
    x: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None

    def embed(self, weight: torch.Tensor) -> None:
        self.x = F.embedding(self.tokens[:, :-1], weight.to(torch.float64))  # (B, T, D)
        if self.cfg.tie_embeddings:
            self.head_weight = weight

    def feed(self, layer: int | None, tensors: dict[str, torch.Tensor]) -> None:
        """Advance with one group of forward-ordered tensors: a block's (full keys), or embed/norm/lm_head."""
        if layer is not None:
            prefix = f"layers.{layer}."
            self.block({k.removeprefix(prefix): v for k, v in tensors.items()})
            return
        if "embed.weight" in tensors:
            self.embed(tensors["embed.weight"])
        self.norm_weight = tensors.get("norm.weight", self.norm_weight)
        self.head_weight = tensors.get("lm_head.weight", self.head_weight)

    def block(self, tensors: dict[str, torch.Tensor]) -> None:
        """Run one decoder block given its tensors keyed by suffix (``attn.q_proj.weight``, ...)."""
        assert self.x is not None, "call embed() first"
        with torch.device("meta"):
            blk = Block(self.cfg, 0)
        blk.load_state_dict({k: v.to(torch.float64) for k, v in tensors.items()}, assign=True)
        use_fp64_norms(blk)
        cos, sin = rope_cos_sin(self.cfg, self.x.shape[1], self.x.device, torch.float64)
        with torch.no_grad():
            self.x, _ = blk(self.x, cos, sin)

    def finish(self, norm_weight: torch.Tensor | None = None, lm_head_weight: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, float]:
        """(logits (B, T, V) float64, mean next-token loss); weights default to those ``feed`` saw."""
        norm_weight = self.norm_weight if norm_weight is None else norm_weight
        lm_head_weight = self.head_weight if lm_head_weight is None else lm_head_weight
        assert self.x is not None and norm_weight is not None and lm_head_weight is not None, "feed every tensor first"
        norm = Fp64RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps)
        norm.weight = nn.Parameter(norm_weight.to(torch.float64), requires_grad=False)
        with torch.no_grad():
            logits = F.linear(norm(self.x), lm_head_weight.to(torch.float64))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.tokens[:, 1:].reshape(-1)).item()
        return logits, loss


def probe(cfg: ModelConfig, get: Callable[[str], torch.Tensor], tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits and loss of the model whose tensors ``get`` returns, one block in memory at a time."""
    fwd = ProbeForward(cfg, tokens)
    fwd.embed(get("embed.weight"))
    for layer in range(cfg.num_layers):
        fwd.block({s: get(f"layers.{layer}.{s}") for s in layer_suffixes(cfg)})
    return fwd.finish(get("norm.weight"), get("embed.weight" if cfg.tie_embeddings else "lm_head.weight"))


def layer_groups(keys: list[str]) -> Iterator[tuple[int | None, list[str]]]:
    """Group forward-ordered keys by layer index (None for embed/norm/lm_head)."""
    current: int | None = None
    group: list[str] = []
    for k in keys:
        layer = int(k.split(".")[1]) if k.startswith("layers.") else None
        if group and layer != current:
            yield current, group
            group = []
        current = layer
        group.append(k)
    if group:
        yield current, group


def compare(before: tuple[torch.Tensor, float], after: tuple[torch.Tensor, float]) -> dict[str, Any]:
    """The function-preservation numbers the growth report keeps."""
    diff = (before[0] - after[0]).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "max_abs_source_logit": before[0].abs().max().item(), "loss_before": before[1], "loss_after": after[1]}

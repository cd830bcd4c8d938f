"""The Aquila3 decoder: RMSNorm, RoPE, grouped-query attention with QKV bias, SwiGLU MLP or MoE layer.

One readable file in the order of nanoGPT's model.py: norm, rope, attention, mlp, moe layer, block, model. The
architecture equals Hugging Face's Qwen2 (GQA + QKV bias + SwiGLU + RMSNorm, RoPE by rotate-half), which
is what Aquila3 uses; ``aquila_ray.hf`` maps the weights one to one. Single-device code: parallelism
(DeepSpeed, expert-parallel groups) is applied in ``aquila_ray.train``.

The MoE layer (``MoELayer``, used for every MLP when ``cfg.moe`` is set): fp32 router, SwiGLU experts,
dropless (or capacity-limited) dispatch, per-layer losses; ``forward(x (B, T, D)) -> (y (B, T, D),
RouterStats)``. Experts are plain SwiGLU MLPs kept in a ``ModuleDict`` keyed by their *global* expert id, so
the state dict carries the checkpoint contract's per-expert keys (``router.weight`` (E, D),
``experts.{e}.gate_proj.weight`` (F_e, D), ``...up_proj``, ``...down_proj`` (D, F_e)) whether a rank holds
all experts or only its expert-parallel share. Routing, its losses and the token dispatcher (with the
expert-parallel all-to-all) are ``aquila_ray.moe``; a layer holds experts ``ep.local_experts(E)``, ``ep``
from the constructor argument, else from the ``use_expert_parallel`` context active at construction, else
size 1 (``aquila_ray.train.parallelize`` builds the groups). References: Sparse Upcycling (arXiv
2212.05055); AquilaMoE (2408.06567); Mixtral routing; Switch/ST-MoE losses; NVIDIA 2412.09952, 2410.07524.

Expert compute: the rows arrive sorted by local expert. On CUDA in bf16 the local experts run as three
grouped GEMMs over the sorted rows (``torch.nn.functional.grouped_mm`` with per-expert end offsets kept on
the device: no host sync in a dropless single-device layer); elsewhere one matmul per expert segment,
which is what CPU's grouped_mm does internally, minus the weight stacking. ``MoELayer.grouped_mm`` (None:
auto) forces either path; both give the same numbers.

Shape legend: B batch, T sequence, D hidden, H query heads, K kv heads, hd head_dim, F intermediate,
V vocab; in the MoE layer N = B*T tokens, E experts, F expert width, A assignments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aquila_ray.config import ModelConfig
from aquila_ray.errors import ConfigError
from aquila_ray.moe.dispatcher import ExpertParallel, capacity, current_expert_parallel, dispatch_combine
from aquila_ray.moe.router import Router, load_balancing_loss, route, router_z_loss


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as Qwen2/LLaMA)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype,
                 offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, hd) for rotate-half RoPE, computed in fp32 and cast."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    half = x_BHTd.shape[-1] // 2
    x1, x2 = x_BHTd[..., :half], x_BHTd[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTd * cos_Td + rotated * sin_Td


class Attention(nn.Module):
    """Causal grouped-query attention; query head h reads kv head h // (H / K)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RouterStats:
    """What one MoE layer reports per forward: its (already coefficient-weighted) losses and load."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    """(E,) number of token assignments each expert received (after any capacity dropping)."""
    dropped_tokens: torch.Tensor
    """() assignments (token, expert pairs) the capacity limit dropped; a tensor, so reading it is the
    caller's choice of when to synchronize with the device."""
    entropy: torch.Tensor
    """() mean per-token entropy of the router's softmax, in nats (no gradient)."""


class MoELayer(nn.Module):
    """Router + E SwiGLU experts (only the local ones under expert parallelism)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, ep: ExpertParallel | None = None) -> None:
        super().__init__()
        if cfg.moe is None:
            raise ConfigError("MoELayer needs ModelConfig.moe to be set (got None, a dense config)")
        self.moe = cfg.moe
        self.layer_idx = layer_idx
        self.hidden_size = cfg.hidden_size
        self.expert_size = cfg.expert_intermediate_size
        self.router = Router(cfg.hidden_size, cfg.moe)
        self.ep = ep if ep is not None else current_expert_parallel()
        self.experts = nn.ModuleDict({str(e): MLP(cfg.hidden_size, self.expert_size)
                                      for e in self.ep.local_experts(cfg.moe.num_experts)})
        self.grouped_mm: bool | None = None
        """Run the local experts as grouped GEMMs (True), per-expert matmuls (False), or pick (None: grouped
        on CUDA in bf16 when the widths are multiples of 8, the kernel's 16-byte alignment)."""

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def local_expert_ids(self) -> list[int]:
        return [int(e) for e in self.experts]

    def set_expert_parallel(self, ep: ExpertParallel) -> None:
        """Keep only ``ep``'s local experts (for a layer built with all of them); the router stays whole."""
        keep = ep.local_experts(self.num_experts)
        missing = [e for e in keep if str(e) not in self.experts]
        if missing:
            raise ConfigError(f"layer {self.layer_idx} does not hold experts {missing} needed by expert-parallel "
                              f"rank {ep.rank}/{ep.size}; shard a layer built with every expert")
        self.experts = nn.ModuleDict({str(e): self.experts[str(e)] for e in keep})
        self.ep = ep

    def _use_grouped_mm(self, xs: torch.Tensor) -> bool:
        if self.grouped_mm is not None:
            return self.grouped_mm
        return xs.is_cuda and xs.dtype == torch.bfloat16 and self.hidden_size % 8 == 0 and self.expert_size % 8 == 0

    def _run_experts(self, xs_AD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """Rows sorted by local expert (``counts_L`` rows each) -> expert outputs in the same order. Every
        expert runs (even on zero rows) so each expert parameter gets a gradient on every step (identical
        reduction sets)."""
        experts = list(self.experts.values())
        if self._use_grouped_mm(xs_AD):
            offs = torch.cumsum(counts_L, 0).to(torch.int32)
            # (E_l, out, in) stacked, transposed to (E_l, in, out): ``x @ W.T`` per group (a view for E_l == 1)
            gate, up, down = (torch.stack([getattr(e, n).weight for e in experts]).transpose(1, 2)
                              for n in ("gate_proj", "up_proj", "down_proj"))
            h = F.silu(F.grouped_mm(xs_AD, gate, offs=offs)) * F.grouped_mm(xs_AD, up, offs=offs)
            return F.grouped_mm(h, down, offs=offs)
        chunks = xs_AD.split(counts_L.tolist())
        outs = [expert(chunk) for expert, chunk in zip(experts, chunks, strict=True)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE = self.router(x_ND)
        r = route(logits_NE, self.moe, self.router.expert_bias)
        cap = capacity(B * T, self.moe.top_k, self.num_experts, self.moe.capacity_factor)
        out = dispatch_combine(x_ND, r.expert_idx_Nk, r.weight_Nk, self.num_experts, self._run_experts,
                               self.ep, cap)
        sequences = B if self.moe.aux_loss_scope == "sequence" else 1
        stats = RouterStats(
            aux_loss=load_balancing_loss(r.probs_NE, r.expert_idx_Nk, self.moe.aux_loss_coeff, sequences),
            z_loss=router_z_loss(r.logits_NE, self.moe.z_loss_coeff),
            tokens_per_expert=out.tokens_per_expert_E,
            dropped_tokens=out.dropped_assignments,
            entropy=r.entropy(),
        )
        return out.y_ND.view(B, T, D), stats

    def extra_repr(self) -> str:
        m = self.moe
        return (f"layer={self.layer_idx}, experts={m.num_experts} (local {self.local_expert_ids[0]}.."
                f"{self.local_expert_ids[-1]}), top_k={m.top_k}, order={m.router_order}, "
                f"capacity_factor={m.capacity_factor}")


def build_mlp(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """A dense SwiGLU MLP, or an MoE layer when ``cfg.moe`` is set (forward returns (y, RouterStats))."""
    return MLP(cfg.hidden_size, cfg.intermediate_size) if cfg.moe is None else MoELayer(cfg, layer_idx)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = build_mlp(cfg, layer_idx)
        self.is_moe = cfg.moe is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, recompute_mlp: bool = False
                ) -> tuple[torch.Tensor, RouterStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h, stats = checkpoint(self._mlp, x, use_reentrant=False) if recompute_mlp else self._mlp(x)
        return x + h, stats

    def _mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        if self.is_moe:
            return self.mlp(self.mlp_norm(x))  # type: ignore[no-any-return]
        return self.mlp(self.mlp_norm(x)), None


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, V)."""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy when labels were given (auxiliary losses not included)."""
    aux_loss: torch.Tensor | None = None
    """MoE load-balancing loss summed over layers (coefficient applied); None for dense models."""
    z_loss: torch.Tensor | None = None
    """MoE router z-loss summed over layers (coefficient applied); None for dense models."""
    router_stats: list[RouterStats] = field(default_factory=list)

    @property
    def total_loss(self) -> torch.Tensor:
        """What training minimizes: loss + aux_loss + z_loss."""
        if self.loss is None:
            raise ValueError("total_loss needs labels: call model(input_ids, labels=...)")
        extra = [t for t in (self.aux_loss, self.z_loss) if t is not None]
        return self.loss + sum(extra) if extra else self.loss


class Aquila3(nn.Module):
    """The decoder. ``model(input_ids)`` -> ModelOutput with ``.logits`` (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # init_weights owns initialization: skipping nn.Embedding's default normal_ also keeps a meta-device
        # build (checkpoint checks, growth, upcycling) from importing torch._dynamo (1.3 s per process here).
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                  _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing: str = "none"
        """What a training forward recomputes in backward instead of keeping (a training setting, not part of
        the checkpoint): "none"; "full" keeps only each block's input and recomputes the block; "selective"
        recomputes each block's MLP half (norm + SwiGLU or MoE, the widest activations) and keeps attention's.
        Same numbers either way (``torch.utils.checkpoint``, non-reentrant)."""
        self._rope_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when the config says so (again after
        ``to_empty``, which gives every parameter its own storage)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self, seed: int | None = None) -> Aquila3:
        """Normal(0, init_std) for weights, zeros for biases, ones for norms; seeded if asked."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                elif p.device.type == "meta":
                    continue
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        # MoE layers own their router init (its std differs from init_std).
        for m in self.modules():
            if m is not self and hasattr(m, "reset_router"):
                m.reset_router(gen)  # type: ignore[operator]
        return self

    def rope(self, T: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (T, device, dtype)
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_cos_sin(self.config, T, device, dtype)}
        return self._rope_cache[key]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        x = self.embed(input_ids)  # (B, T, D)
        cos, sin = self.rope(input_ids.shape[1], x.device, x.dtype)
        stats: list[RouterStats] = []
        mode = self.activation_checkpointing if self.training and torch.is_grad_enabled() else "none"
        for layer in self.layers:
            if mode == "full":
                x, s = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x, s = layer(x, cos, sin, recompute_mlp=mode == "selective")
            if s is not None:
                stats.append(s)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100)
        out = ModelOutput(logits=logits, loss=loss, router_stats=stats)
        if stats:
            out.aux_loss = torch.stack([s.aux_loss for s in stats]).sum()
            out.z_loss = torch.stack([s.z_loss for s in stats]).sum()
        return out

    def num_params(self) -> int:
        """Distinct parameters actually held (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def build_model(cfg: ModelConfig, seed: int | None = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Aquila3:
    """A freshly initialized model; on the meta device nothing is allocated (for planning big presets)."""
    with torch.device(device):
        model = Aquila3(cfg)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model.to(dtype=dtype)


__all__ = ["MLP", "Aquila3", "Attention", "Block", "ModelOutput", "MoELayer", "RMSNorm", "RouterStats", "build_model"]

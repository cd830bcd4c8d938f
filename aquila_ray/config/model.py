"""Model configuration: the Aquila3 decoder (dense) and its Mixture-of-Experts variant.

Shapes follow DESIGN.md's table (seed: AquilaMoE, arXiv 2408.06567). Parameter and FLOP counts are
analytic so the 100B-parameter presets can be planned without allocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from aquila_ray.errors import ConfigError

RouterOrder = Literal["topk_then_softmax", "softmax_then_topk"]


def _positive(obj: object, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n}={v!r} must be a positive integer")


@dataclass
class MoEConfig:
    """Mixture-of-Experts settings; a model with ``moe`` set replaces every MLP by an MoE layer."""

    num_experts: int = 8
    """Experts per MoE layer (E)."""
    top_k: int = 2
    """Experts each token is routed to."""
    expert_intermediate_size: int | None = None
    """Hidden width of one expert; None means the model's intermediate_size (plain upcycling)."""
    router_init_std: float = 0.02
    """Std of the N(0, std) router init. The seed's 'variance 0.02' is read as std 0.02 (Megatron's
    init_method_std); set sqrt(0.02)=0.1414 for the literal variance reading."""
    router_order: RouterOrder = "topk_then_softmax"
    """topk_then_softmax: softmax over the k selected logits (Mixtral; exactly preserving after
    upcycling). softmax_then_topk: softmax over all experts, then select (2410.07524)."""
    renormalize: bool = True
    """For softmax_then_topk: divide the k selected probabilities by their sum."""
    aux_loss_coeff: float = 0.001
    """Load-balancing loss coefficient: coeff * E * sum_e f_e * P_e per layer."""
    z_loss_coeff: float = 0.01
    """Router z-loss coefficient: coeff * mean_t(logsumexp_j x_tj)^2 per layer (ST-MoE)."""
    capacity_factor: float | None = None
    """None: dropless. Otherwise each expert takes at most ceil(cf * tokens * k / E) tokens."""
    granularity: int = 1
    """Virtual-group granular upcycling (2410.07524): each dense MLP is split into G slices."""

    def __post_init__(self) -> None:
        _positive(self, "num_experts", "top_k", "granularity")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; top_k must be "
                f"between 1 and num_experts"
            )
        if self.expert_intermediate_size is not None:
            _positive(self, "expert_intermediate_size")
        if self.router_init_std < 0:
            raise ConfigError(f"MoEConfig.router_init_std={self.router_init_std} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(
                f"MoEConfig.capacity_factor={self.capacity_factor} must be > 0, or null for dropless"
            )
        if self.num_experts % self.granularity:
            raise ConfigError(
                f"MoEConfig.num_experts={self.num_experts} must be divisible by "
                f"granularity={self.granularity} (E experts form E/G virtual groups of G slices)"
            )


@dataclass
class ModelConfig:
    """The Aquila3 decoder: RMSNorm, RoPE, GQA attention with QKV bias, SwiGLU MLP (optionally MoE)."""

    vocab_size: int = 100_008
    """Vocabulary size (Aquila2's tokenizer has 100,008 entries; set to the tokenizer you train)."""
    hidden_size: int = 4096
    """Residual stream width D."""
    intermediate_size: int = 14336
    """SwiGLU hidden width F of the dense MLP."""
    num_layers: int = 32
    """Decoder blocks L."""
    num_heads: int = 32
    """Query heads; head_dim = hidden_size // num_heads."""
    num_kv_heads: int = 8
    """Key/value heads (GQA groups); must divide num_heads."""
    max_seq_len: int = 4096
    """Longest context the model is trained for."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    qkv_bias: bool = True
    """Bias on the q, k and v projections (Aquila3 and Qwen2 have it; Mixtral does not)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    """Std of the normal init for linear and embedding weights."""
    moe: MoEConfig | None = None
    """Mixture-of-Experts settings; None for a dense model."""
    extra: dict[str, float] = field(default_factory=dict)
    """Free-form numeric annotations kept with the checkpoint (e.g. growth provenance)."""

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "max_seq_len")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads="
                f"{self.num_heads}; head_dim = hidden_size / num_heads must be an integer"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_heads={self.num_heads} is not divisible by num_kv_heads="
                f"{self.num_kv_heads}; every KV group must hold the same number of query heads"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig head_dim={self.head_dim} (hidden_size / num_heads) must be even for RoPE")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.init_std < 0:
            raise ConfigError(
                f"ModelConfig.rope_theta={self.rope_theta}, rms_norm_eps={self.rms_norm_eps} must be > 0 "
                f"and init_std={self.init_std} >= 0"
            )
        if isinstance(self.moe, dict):  # built by hand from JSON
            self.moe = MoEConfig(**self.moe)

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def expert_intermediate_size(self) -> int:
        if self.moe is None or self.moe.expert_intermediate_size is None:
            return self.intermediate_size
        return self.moe.expert_intermediate_size

    def attention_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        q = d * self.num_heads * hd
        kv = 2 * d * self.num_kv_heads * hd
        o = self.num_heads * hd * d
        bias = (self.num_heads + 2 * self.num_kv_heads) * hd if self.qkv_bias else 0
        return q + kv + o + bias

    def mlp_params(self, active: bool = False) -> int:
        """Parameters of one layer's MLP (all experts, or the top_k active ones, plus the router)."""
        if self.moe is None:
            return 3 * self.hidden_size * self.intermediate_size
        expert = 3 * self.hidden_size * self.expert_intermediate_size
        router = self.hidden_size * self.moe.num_experts
        return router + expert * (self.moe.top_k if active else self.moe.num_experts)

    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        """Total (or per-token active) parameter count; ``embeddings=False`` leaves out the input table."""
        per_layer = self.attention_params() + self.mlp_params(active) + 2 * self.hidden_size
        n = self.num_layers * per_layer + self.hidden_size  # + final norm
        head = self.vocab_size * self.hidden_size
        n += head if embeddings else 0  # input embedding
        if not self.tie_embeddings or not embeddings:
            n += head  # output projection (a matmul per token even when tied)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM appendix B: 6 * N + 12 * L * H * Q * T, with N the active
        non-embedding parameters (lm_head included, input table not), H heads of size Q, context T.
        The causal mask's saving is not subtracted, as in PaLM's and Megatron's MFU accounting."""
        t = self.max_seq_len if seq_len is None else seq_len
        dense_part = 6 * self.num_params(active=True, embeddings=False)
        attn = 12 * self.num_layers * self.num_heads * self.head_dim * t
        return float(dense_part + attn)

    def describe(self) -> str:
        kind = f"MoE {self.moe.num_experts}x top-{self.moe.top_k}" if self.moe else "dense"
        return (
            f"{kind}: L={self.num_layers} D={self.hidden_size} F={self.intermediate_size} "
            f"heads={self.num_heads}/{self.num_kv_heads} V={self.vocab_size} "
            f"params={_human(self.num_params())} active={_human(self.num_params(active=True))}"
        )


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


"""Model configuration: the Aquila3 decoder (dense) and its Mixture-of-Experts variant.

Shapes follow DESIGN.md's table (seed: AquilaMoE, arXiv 2408.06567). Parameter and FLOP counts are
analytic so the 100B-parameter presets can be planned without allocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from aquila_ray.errors import ConfigError

RouterOrder = Literal["topk_then_softmax", "softmax_then_topk"]
AuxLossScope = Literal["batch", "sequence"]


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
    aux_loss_scope: AuxLossScope = "batch"
    """batch: the load-balancing loss over all tokens of the micro-batch (Switch, GShard); sequence: computed
    per sequence and averaged (DeepSeek-V2/V3's sequence-wise balance loss), which also penalizes a
    sequence that sends all its tokens to one expert while the batch as a whole is balanced."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437; Wang et al., arXiv 2408.15664):
    each layer keeps a per-expert bias that is added to the router scores for *choosing* experts only (the
    combine weights come from the unbiased scores, so the loss function is unchanged). After every optimizer
    step each bias moves by this rate towards balance: -rate for an expert that got more than the mean load,
    +rate for one that got less. 0 turns it off (DeepSeek-V3 used 0.001 with aux_loss_coeff ~0)."""
    router_lr_mult: float = 1.0
    """Learning rate of the router weights as a multiple of the schedule's lr (a freshly upcycled router
    starts from noise while the experts are trained copies; a larger router lr lets routing settle first)."""
    expert_lr_mult: float = 1.0
    """Learning rate of the expert weights as a multiple of the schedule's lr."""
    drop_upcycling_ratio: float = 0.0
    """Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261), used when a dense model is upcycled:
    each expert re-initializes this fraction r of its intermediate units (a different random set per
    expert: those rows of gate_proj and up_proj and columns of down_proj) from N(mean, std) of the dense
    matrix they came from; the rest stay copies. It breaks the copies' symmetry so experts specialize (the
    paper: r = 0.5); the fresh MoE is then no longer the dense function. 0: plain copies."""

    def __post_init__(self) -> None:
        _positive(self, "num_experts", "top_k", "granularity")
        for name, kind in (("router_order", RouterOrder), ("aux_loss_scope", AuxLossScope)):
            if getattr(self, name) not in get_args(kind):
                raise ConfigError(f"MoEConfig.{name}={getattr(self, name)!r} is not valid; choose one of "
                                  f"{list(get_args(kind))}")
        if not self.bias_update_rate >= 0:
            raise ConfigError(f"MoEConfig.bias_update_rate={self.bias_update_rate} must be >= 0 (0 turns the "
                              f"auxiliary-loss-free balancer off)")
        for name in ("router_lr_mult", "expert_lr_mult"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"MoEConfig.{name}={getattr(self, name)} must be > 0 (a multiple of the lr)")
        if not 0 <= self.drop_upcycling_ratio <= 1:
            raise ConfigError(f"MoEConfig.drop_upcycling_ratio={self.drop_upcycling_ratio} must lie in [0, 1] (the "
                              f"fraction of each expert's intermediate units re-initialized; 0 turns it off)")
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


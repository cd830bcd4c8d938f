"""The fp32 top-k router and the two router losses.

Routing follows Mixtral (``topk_then_softmax``: softmax over the k selected logits, which makes a freshly
upcycled layer exactly the dense MLP, Komatsuzaki et al., arXiv 2212.05055) or NVIDIA's preferred order
(``softmax_then_topk``, arXiv 2410.07524), optionally renormalized. Logits are computed in fp32 whatever
the model dtype, and there is no noise: routing is deterministic in train and eval mode (DeepSpeed's
TopKGate samples its 2nd expert with Gumbel noise, even in eval; this router never does).

Losses, both per layer and already multiplied by their coefficients:
- load balancing (Switch / GShard, Megatron normalization): ``coeff * E * sum_e f_e * P_e`` with ``f_e``
  the fraction of the N*k assignments that chose expert e (before any capacity dropping) and ``P_e`` the
  mean full-softmax probability of e. Perfectly uniform routing gives exactly ``coeff``. With
  ``aux_loss_scope="sequence"`` f and P are taken per sequence and the loss is averaged over sequences
  (DeepSeek-V2/V3's sequence-wise balance loss).
- router z-loss (ST-MoE, arXiv 2202.08906): ``coeff * mean_t(logsumexp_j x_tj)^2``; all-zero logits give
  ``coeff * (ln E)^2``.

Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437): with ``bias_update_rate > 0`` the router
keeps a per-expert bias (a buffer, saved with the model) that is added to the scores used to *choose* the
k experts; the combine weights come from the unbiased scores. ``Router.update_bias(load)`` moves each bias
by the rate towards balance after an optimizer step (the trainer calls it with the step's global load).

Shape legend: N tokens, B sequences, T tokens per sequence, D hidden, E experts, k top_k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aquila_ray.config import MoEConfig


@dataclass
class Routing:
    """One routing decision for N tokens."""

    expert_idx_Nk: torch.Tensor
    """(N, k) int64 chosen experts, in descending router preference."""
    weight_Nk: torch.Tensor
    """(N, k) fp32 combine weights (sum to 1 per token when the routing normalizes)."""
    logits_NE: torch.Tensor
    """(N, E) fp32 router logits."""
    probs_NE: torch.Tensor
    """(N, E) fp32 softmax over all experts (what the load-balancing loss uses)."""

    def entropy(self) -> torch.Tensor:
        """Mean per-token entropy of the router's softmax, in nats (ln E: uniform; 0: one-hot); no gradient."""
        return torch.special.entr(self.probs_NE.detach()).sum(-1).mean()


def route(logits_NE: torch.Tensor, cfg: MoEConfig, bias_E: torch.Tensor | None = None) -> Routing:
    """Select top-k experts per token and their combine weights from fp32 logits. ``bias_E`` (the
    auxiliary-loss-free balancer's) shifts which experts are chosen, never the weights."""
    logits_NE = logits_NE.float()
    probs_NE = logits_NE.softmax(dim=-1)
    scores_NE = logits_NE if cfg.router_order == "topk_then_softmax" else probs_NE
    if bias_E is None:
        top_scores, idx = scores_NE.topk(cfg.top_k, dim=-1)
    else:
        idx = (scores_NE + bias_E).topk(cfg.top_k, dim=-1).indices
        top_scores = scores_NE.gather(-1, idx)
    if cfg.router_order == "topk_then_softmax":
        weight = top_scores.softmax(dim=-1)
    else:
        weight = top_scores / top_scores.sum(dim=-1, keepdim=True) if cfg.renormalize else top_scores
    return Routing(expert_idx_Nk=idx, weight_Nk=weight, logits_NE=logits_NE, probs_NE=probs_NE)


def load_balancing_loss(probs_NE: torch.Tensor, expert_idx_Nk: torch.Tensor, coeff: float,
                        sequences: int = 1) -> torch.Tensor:
    """``coeff * E * sum_e f_e * P_e``; f_e has no gradient (it counts discrete choices). With ``sequences``
    B > 1 the N = B*T tokens are B sequences (in order) and the loss is the mean of each sequence's."""
    N, E = probs_NE.shape
    if N == 0:
        return probs_NE.new_zeros(())
    B, k = sequences, expert_idx_Nk.shape[-1]
    onehot_BTkE = F.one_hot(expert_idx_Nk.reshape(B, N // B, k), E)
    f_BE = onehot_BTkE.sum(dim=(1, 2)).to(probs_NE.dtype) / (N // B * k)
    P_BE = probs_NE.reshape(B, N // B, E).mean(dim=1)
    return coeff * E * (f_BE * P_BE).sum(-1).mean()


def router_z_loss(logits_NE: torch.Tensor, coeff: float) -> torch.Tensor:
    """``coeff * mean_t(logsumexp_j x_tj)^2`` (ST-MoE)."""
    if logits_NE.shape[0] == 0:
        return logits_NE.new_zeros(())
    return coeff * torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


class Router(nn.Module):
    """Linear D -> E without bias, evaluated in fp32; init N(0, router_init_std). With
    ``cfg.bias_update_rate > 0`` it also holds ``expert_bias`` (E,), the balancer's selection bias."""

    def __init__(self, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))  # (E, D)
        self.expert_bias: torch.Tensor | None
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32)
                             if cfg.bias_update_rate > 0 else None)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """(N, D) -> fp32 logits (N, E)."""
        return F.linear(x_ND.float(), self.weight.float())

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """One balancer step from the assignments each expert received in the last optimizer step (summed
        over all ranks, so every rank applies the same update): ``bias_e += rate * sign(mean - load_e)``."""
        if self.expert_bias is None:
            raise ValueError("Router.update_bias needs MoEConfig.bias_update_rate > 0")
        load_E = load_E.to(torch.float64)
        step_E = torch.sign(load_E.mean() - load_E) * self.cfg.bias_update_rate
        self.expert_bias.add_(step_E.to(self.expert_bias))

    def _apply(self, fn: Any, recurse: bool = True) -> Router:
        """``.to(bf16)`` and friends move the balancer's bias but keep it fp32 (0.001 steps vanish in bf16)."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(self.expert_bias.device, torch.float32)
        return self

    def reset_router(self, generator: torch.Generator | None = None) -> None:
        """N(0, router_init_std); called by ``Aquila3.init_weights`` after its generic init."""
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            if self.expert_bias is not None:
                self.expert_bias.zero_()
            w = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32) * self.cfg.router_init_std
            self.weight.copy_(w)


__all__ = ["Router", "Routing", "load_balancing_loss", "route", "router_z_loss"]

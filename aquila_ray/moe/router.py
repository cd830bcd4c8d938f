"""The fp32 top-k router and the two router losses.

Routing follows Mixtral (``topk_then_softmax``: softmax over the k selected logits, which makes a freshly
upcycled layer exactly the dense MLP, Komatsuzaki et al., arXiv 2212.05055) or NVIDIA's preferred order
(``softmax_then_topk``, arXiv 2410.07524), optionally renormalized. Logits are computed in fp32 whatever
the model dtype, and there is no noise: routing is deterministic in train and eval mode (DeepSpeed's
TopKGate samples its 2nd expert with Gumbel noise, even in eval; this router never does).

Losses, both per layer and already multiplied by their coefficients:
- load balancing (Switch / GShard, Megatron normalization): ``coeff * E * sum_e f_e * P_e`` with ``f_e``
  the fraction of the N*k assignments that chose expert e (before any capacity dropping) and ``P_e`` the
  mean full-softmax probability of e. Perfectly uniform routing gives exactly ``coeff``.
- router z-loss (ST-MoE, arXiv 2202.08906): ``coeff * mean_t(logsumexp_j x_tj)^2``; all-zero logits give
  ``coeff * (ln E)^2``.

Shape legend: N tokens, D hidden, E experts, k top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def route(logits_NE: torch.Tensor, cfg: MoEConfig) -> Routing:
    """Select top-k experts per token and their combine weights from fp32 logits."""
    logits_NE = logits_NE.float()
    probs_NE = logits_NE.softmax(dim=-1)
    if cfg.router_order == "topk_then_softmax":
        top_logits, idx = logits_NE.topk(cfg.top_k, dim=-1)
        weight = top_logits.softmax(dim=-1)
    else:
        weight, idx = probs_NE.topk(cfg.top_k, dim=-1)
        if cfg.renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
    return Routing(expert_idx_Nk=idx, weight_Nk=weight, logits_NE=logits_NE, probs_NE=probs_NE)


def load_balancing_loss(probs_NE: torch.Tensor, expert_idx_Nk: torch.Tensor, coeff: float) -> torch.Tensor:
    """``coeff * E * sum_e f_e * P_e``; f_e has no gradient (it counts discrete choices)."""
    N, E = probs_NE.shape
    if N == 0:
        return probs_NE.new_zeros(())
    counts_E = torch.bincount(expert_idx_Nk.reshape(-1), minlength=E).to(probs_NE.dtype)
    f_E = counts_E / expert_idx_Nk.numel()
    P_E = probs_NE.mean(dim=0)
    return coeff * E * (f_E * P_E).sum()


def router_z_loss(logits_NE: torch.Tensor, coeff: float) -> torch.Tensor:
    """``coeff * mean_t(logsumexp_j x_tj)^2`` (ST-MoE)."""
    if logits_NE.shape[0] == 0:
        return logits_NE.new_zeros(())
    return coeff * torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


class Router(nn.Module):
    """Linear D -> E without bias, evaluated in fp32; init N(0, router_init_std)."""

    def __init__(self, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))  # (E, D)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """(N, D) -> fp32 logits (N, E)."""
        return F.linear(x_ND.float(), self.weight.float())

    def reset_router(self, generator: torch.Generator | None = None) -> None:
        """N(0, router_init_std); called by ``Aquila3.init_weights`` after its generic init."""
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            w = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32) * self.cfg.router_init_std
            self.weight.copy_(w)


__all__ = ["Router", "Routing", "load_balancing_loss", "route", "router_z_loss"]

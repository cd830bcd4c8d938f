"""The MoE layer: fp32 router, SwiGLU experts, dropless (or capacity-limited) dispatch, per-layer losses.

``MoELayer(cfg, layer_idx)`` replaces a block's MLP when ``cfg.moe`` is set (``model.build_mlp``);
``forward(x (B, T, D)) -> (y (B, T, D), RouterStats)``. Experts are plain SwiGLU MLPs kept in a
``ModuleDict`` keyed by their *global* expert id, so the state dict carries the checkpoint contract's
per-expert keys (``router.weight`` (E, D), ``experts.{e}.gate_proj.weight`` (F_e, D), ``...up_proj``,
``...down_proj`` (D, F_e)) whether a rank holds all experts or only its expert-parallel share.

Expert parallelism (see ``aquila_ray.train.parallelize`` for groups and DeepSpeed): a layer holds experts
``ep.local_experts(E)``; ``ep`` comes from the constructor argument, else from the
``use_expert_parallel`` context active at construction, else size 1. ``set_expert_parallel`` shards a
layer built with every expert (drops the others). The router is replicated on every rank.

References: Sparse Upcycling (Komatsuzaki et al., arXiv 2212.05055); AquilaMoE (arXiv 2408.06567);
Mixtral routing; Switch/ST-MoE losses; NVIDIA arXiv 2412.09952 and 2410.07524.

Expert compute: the rows arrive sorted by local expert. On CUDA in bf16 the local experts run as three
grouped GEMMs over the sorted rows (``torch.nn.functional.grouped_mm`` with per-expert end offsets kept on
the device: no host sync in a dropless single-device layer); elsewhere one matmul per expert segment,
which is what CPU's grouped_mm does internally, minus the weight stacking. ``grouped_mm`` (None: auto)
forces either path; both give the same numbers.

Shape legend: B batch, T sequence, N = B*T tokens, D hidden, E experts, F expert width, A assignments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aquila_ray.config import ModelConfig
from aquila_ray.errors import ConfigError
from aquila_ray.model.model import MLP, RouterStats
from aquila_ray.moe.dispatcher import ExpertParallel, capacity, current_expert_parallel, dispatch_combine
from aquila_ray.moe.router import Router, load_balancing_loss, route, router_z_loss


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


__all__ = ["MoELayer"]

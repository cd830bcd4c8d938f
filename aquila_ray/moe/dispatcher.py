"""Token dispatcher: permute tokens by expert, exchange them over the expert-parallel group, combine.

The one module under ``aquila_ray/moe`` (with ``parallel.py``) that touches ``torch.distributed``. With
expert-parallel size 1 (the default) no process group exists and nothing here communicates.

The exchange is Megatron's all-to-all dispatcher (arXiv 2412.09952 trains this way at EP8):
1. the N*k (token, expert) assignments are sorted by global expert id (stable, so token order is kept
   within an expert), which groups them by destination rank because rank r holds experts
   ``[r*E_l, (r+1)*E_l)``;
2. optional capacity: each expert keeps its first ``C = ceil(cf * N * k / E)`` assignments (counted on this
   rank's tokens), the rest are dropped and counted;
3. per-expert counts go through one ``all_to_all_single``, then the token rows through another with
   uneven splits (gloo supports the single-tensor form with uneven splits, not the list form);
4. received rows (grouped by source rank, then local expert) are re-sorted by local expert, run through
   the local experts, un-sorted, and sent back by the reverse all-to-all;
5. each token's k outputs are summed with their router weights (``index_add_``).
The all-to-all is an autograd function whose backward is the reverse exchange, so expert gradients on a
rank include every rank's tokens: expert parameters are reduced only over the expert-data-parallel group.

Shape legend: N tokens on this rank, D hidden, E experts, E_l local experts, k top_k, A assignments.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from aquila_ray.errors import ConfigError


@dataclass(frozen=True)
class ExpertParallel:
    """Where this rank sits in its expert-parallel group (size 1: every expert is local, no group)."""

    size: int = 1
    """Ranks that together hold one copy of every expert."""
    rank: int = 0
    """This rank's index inside the expert-parallel group; it holds experts [rank*E/size, (rank+1)*E/size)."""
    group: Any = None
    """The ``torch.distributed`` process group of the expert-parallel ranks. None is fine for size 1, and
    for building or loading a rank's share offline; a forward pass with size > 1 needs the group."""

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"ExpertParallel(size={self.size}, rank={self.rank}): need size >= 1 and "
                              f"0 <= rank < size")

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds (contiguous block)."""
        if num_experts % self.size:
            raise ConfigError(f"MoEConfig.num_experts={num_experts} is not divisible by the expert-parallel "
                              f"size {self.size}; choose an expert-parallel size that divides num_experts")
        n = num_experts // self.size
        return range(self.rank * n, (self.rank + 1) * n)


SINGLE_DEVICE = ExpertParallel()
"""Expert-parallel size 1: every expert local, no communication."""

_CURRENT: contextvars.ContextVar[ExpertParallel] = contextvars.ContextVar("aquila_expert_parallel",
                                                                           default=SINGLE_DEVICE)


def current_expert_parallel() -> ExpertParallel:
    """The expert-parallel placement MoE layers built now will use (size 1 outside ``use_expert_parallel``)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_expert_parallel(ep: ExpertParallel) -> Iterator[ExpertParallel]:
    """Build models inside this block to create only this rank's experts::

        with use_expert_parallel(ep):
            model = Aquila3(cfg)          # each MoE layer holds experts ep.local_experts(E)
    """
    token = _CURRENT.set(ep)
    try:
        yield ep
    finally:
        _CURRENT.reset(token)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward sends gradients back the way the rows came."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int],  # type: ignore[override]
                group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows of ``x`` (row counts per peer in the splits)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)  # type: ignore[no-any-return]


ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Runs the local experts: rows sorted by local expert, and the (E_l,) row count of each local expert."""


@dataclass
class Dispatched:
    y_ND: torch.Tensor
    """Combined output per token."""
    tokens_per_expert_E: torch.Tensor
    """(E,) assignments from this rank's tokens that each global expert processed (after dropping)."""
    dropped_assignments: torch.Tensor
    """() assignments (token, expert pairs) dropped by the capacity limit."""


def capacity(num_tokens: int, cfg_top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Per-expert capacity ``ceil(cf * N * k / E)``, or None when dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * cfg_top_k / num_experts)


def dispatch_combine(x_ND: torch.Tensor, expert_idx_Nk: torch.Tensor, weight_Nk: torch.Tensor,
                     num_experts: int, run_experts: ExpertsFn, ep: ExpertParallel,
                     capacity_per_expert: int | None = None) -> Dispatched:
    """Send each token to its k experts (local or over the EP group), run them, and combine. Dropless on
    one device nothing here waits for the device (no ``.item()``, no data-dependent shape); the capacity
    limit and the expert-parallel exchange need the counts on the host."""
    N, k = expert_idx_Nk.shape
    flat_e_A = expert_idx_Nk.reshape(-1)
    order_A = torch.argsort(flat_e_A, stable=True)
    e_sorted_A = flat_e_A[order_A]
    token_A = order_A // k
    w_A = weight_Nk.reshape(-1)[order_A]
    counts_E = torch.bincount(flat_e_A, minlength=num_experts)
    dropped = counts_E.new_zeros(())
    if capacity_per_expert is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        position_A = torch.arange(e_sorted_A.numel(), device=x_ND.device) - starts_E[e_sorted_A]
        keep_A = position_A < capacity_per_expert
        token_A, w_A = token_A[keep_A], w_A[keep_A]
        dropped = (~keep_A).sum()
        counts_E = counts_E.clamp(max=capacity_per_expert)
    xs_AD = x_ND[token_A]

    if ep.size == 1:
        out_AD = run_experts(xs_AD, counts_E)
    else:
        out_AD = _exchange_and_run(xs_AD, counts_E, run_experts, ep)

    y_ND = torch.zeros_like(x_ND)
    y_ND.index_add_(0, token_A, out_AD * w_A.to(out_AD.dtype).unsqueeze(-1))
    return Dispatched(y_ND=y_ND, tokens_per_expert_E=counts_E, dropped_assignments=dropped)


def _exchange_and_run(xs_AD: torch.Tensor, counts_E: torch.Tensor, run_experts: ExpertsFn,
                      ep: ExpertParallel) -> torch.Tensor:
    if ep.group is None:
        raise ConfigError(f"expert-parallel size {ep.size} needs a torch.distributed process group for the "
                          f"forward pass; create it with aquila_ray.train.parallelize.create_expert_parallel_groups")
    E = counts_E.numel()
    E_l = E // ep.size
    # recv_counts[r * E_l + j]: rows rank r sends to my local expert j
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=ep.group)
    send_splits = counts_E.view(ep.size, E_l).sum(1).tolist()
    recv_RL = recv_counts.view(ep.size, E_l)
    recv_splits = recv_RL.sum(1).tolist()
    xr_BD = all_to_all(xs_AD, recv_splits, send_splits, ep.group)  # grouped by (source rank, local expert)
    local_id_B = torch.repeat_interleave(torch.arange(E_l, device=xs_AD.device).repeat(ep.size),
                                         recv_RL.reshape(-1))
    perm_B = torch.argsort(local_id_B, stable=True)
    out_sorted = run_experts(xr_BD[perm_B], recv_RL.sum(0))
    out_BD = torch.empty_like(out_sorted).index_copy(0, perm_B, out_sorted)  # back to (source rank, expert)
    return all_to_all(out_BD, send_splits, recv_splits, ep.group)


__all__ = [
    "Dispatched",
    "ExpertParallel",
    "SINGLE_DEVICE",
    "all_to_all",
    "capacity",
    "current_expert_parallel",
    "dispatch_combine",
    "use_expert_parallel",
]

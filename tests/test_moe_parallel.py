"""Expert parallelism: outputs and gradients with EP size 2 (two gloo processes) equal EP size 1.

Each of the two ranks feeds its own batch. The EP-1 reference is the full model run on both batches in
one process with loss = mean of the two batch losses; the EP-2 run gives every rank its batch, exchanges
tokens by all-to-all, and reduces gradients with ``allreduce_gradients`` (non-expert over the world,
experts over the expert-data-parallel group, both divided by the world size).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aquila_ray.config import get_preset
from aquila_ray.errors import ConfigError
from aquila_ray.model import build_model
from aquila_ray.train.parallelize import (
    create_expert_parallel_groups,
    expert_parallel_layout,
    gather_expert_state_dict,
    local_expert_state,
    mark_expert_params,
    shard_experts,
    split_moe_param_groups,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _configs():  # type: ignore[no-untyped-def]
    cfg = get_preset("tiny-moe")
    capped = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=1.0))
    return [cfg, capped]


def _batches(cfg) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, cfg.vocab_size, (2, 16), generator=g) for _ in range(2)]


def _loss(model, x) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = model(x, labels=x)
    return out.total_loss, out.logits


def _worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from aquila_ray.train.parallelize import allreduce_gradients

        groups = create_expert_parallel_groups(2)
        results = []
        for cfg in _configs():
            xs = _batches(cfg)
            full = build_model(cfg, seed=0)
            full_sd = {k: v.clone() for k, v in full.state_dict().items()}
            # EP size 1 reference: both batches in this process, mean loss
            ref_logits = []
            total = torch.zeros(())
            for x in xs:
                loss, logits = _loss(full, x)
                total = total + loss / 2
                ref_logits.append(logits.detach())
            total.backward()
            ref_grads = {n: p.grad.clone() for n, p in full.named_parameters() if p.grad is not None}
            # EP size 2: this rank's batch only, its own experts
            model = build_model(cfg, seed=0)
            shard_experts(model, groups.ep)
            model.load_state_dict(local_expert_state(model, full_sd))
            loss, logits = _loss(model, xs[rank])
            loss.backward()
            allreduce_gradients(model, groups)
            out_err = (logits - ref_logits[rank]).abs().max().item()
            grad_err = max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters())
            n_experts = len({n.split(".")[4] for n, _ in model.named_parameters() if ".experts." in n})
            gathered = gather_expert_state_dict(model, groups)
            gather_ok = set(gathered) == set(full_sd) and all(torch.equal(gathered[k], full_sd[k]) for k in full_sd)
            dropped = sum(int(s.dropped_tokens) for s in model(xs[rank]).router_stats)
            results.append({"out_err": out_err, "grad_err": grad_err, "local_experts": n_experts,
                            "gather_ok": gather_ok, "dropped": dropped})
        torch.save(results, Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ep1_equals_ep2_outputs_and_gradients() -> None:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(_free_port(), d), nprocs=2, join=True)
        results = [torch.load(Path(d) / f"rank{r}.pt") for r in range(2)]
    for rank_results in results:
        dropless, capped = rank_results
        for r in (dropless, capped):
            assert r["out_err"] < 1e-5, r
            assert r["grad_err"] < 1e-6, r
            assert r["local_experts"] == 4 and r["gather_ok"]
        assert dropless["dropped"] == 0
    assert sum(r[1]["dropped"] for r in results) > 0  # capacity 1.0 drops some assignments


def test_layout_and_param_groups() -> None:
    assert expert_parallel_layout(8, 2) == ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]])
    with pytest.raises(ConfigError, match="must be >= 1 and divide the world size 6"):
        expert_parallel_layout(6, 4)
    model = build_model(get_preset("tiny-moe"), seed=0)
    assert mark_expert_params(model, "ep_size_2") == 2 * 8 * 3
    groups = split_moe_param_groups([{"params": list(model.parameters()), "name": "decay", "weight_decay": 0.1}])
    moe = [g for g in groups if g.get("moe")]
    assert len(moe) == 1 and moe[0]["name"] == "ep_size_2" and len(moe[0]["params"]) == 48
    assert moe[0]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_deepspeed_marker_adds_no_state() -> None:
    from deepspeed.moe.layer import MoE

    from aquila_ray.train.parallelize import register_with_deepspeed

    model = build_model(get_preset("tiny-moe"), seed=0)
    keys = list(model.state_dict())
    groups = create_expert_parallel_groups(1)
    register_with_deepspeed(model, groups)
    assert list(model.state_dict()) == keys
    markers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(markers) == 1 and markers[0].num_experts == 8 and markers[0].ep_size == 1

"""Pieces shared by the Ray Train worker loops: data shards, summed evaluation, fault injection."""

from __future__ import annotations

from typing import Any

import torch

from twa_ray.core.evaluate import EvalResult, evaluate

__all__ = ["strided", "all_reduce_", "evaluate_sharded", "maybe_fail"]


def strided(ds: Any, rank: int, world: int) -> Any:
    """This rank's strided shard ``ds[rank::world]`` (no padding: the shards partition ``ds``,
    so sums over the shards are exact)."""
    from torch.utils.data import Subset

    return Subset(ds, range(rank, len(ds), world))


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the workers in place (a no-op without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def evaluate_sharded(model: torch.nn.Module, loader: Any, device: torch.device) -> EvalResult:
    """:func:`~twa_ray.core.evaluate.evaluate` on this rank's shard, sums all-reduced.

    Pass the unwrapped model: ranks see different shard sizes, and DDP forwards sync buffers.
    """
    r = evaluate(model, loader, device=device)
    sums = all_reduce_(torch.tensor([r.loss_sum, r.correct, r.count], dtype=torch.float64, device=device))
    return EvalResult(float(sums[0]), int(sums[1]), int(sums[2]))


def maybe_fail(config: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Testing hook: the last rank raises once, right after step ``config['fail_at_step']``
    (a marker file keeps the restarted attempt from failing again)."""
    if config.get("fail_at_step") != step or rank != world - 1:
        return
    marker = config["fail_marker"]
    try:
        with open(marker, "x") as f:
            f.write(f"failed at step {step}\n")
    except FileExistsError:
        return
    raise RuntimeError(f"injected worker failure at step {step} (rank {rank}; marker {marker})")

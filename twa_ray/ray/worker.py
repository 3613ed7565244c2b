"""Pieces shared by the Ray Train worker loops: data shards and loaders, mixed precision, summed
evaluation."""

from __future__ import annotations

from typing import Any

import torch

from twa_ray.core.evaluate import EvalResult, evaluate

__all__ = ["strided", "loader_options", "train_autocast", "all_reduce_", "evaluate_sharded"]

GPU_LOADER_WORKERS = 4
"""DataLoader worker processes of a Ray Train worker on a GPU."""


def strided(ds: Any, rank: int, world: int) -> Any:
    """This rank's strided shard ``ds[rank::world]`` (no padding: the shards partition ``ds``,
    so sums over the shards are exact)."""
    from torch.utils.data import Subset

    return Subset(ds, range(rank, len(ds), world))


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader options: on a GPU, worker processes decode and augment while the device
    computes, and pinned batches make the ``non_blocking`` copies asynchronous; on the CPU the
    training process loads (the Ray Train worker owns its cores)."""
    if device.type != "cuda":
        return {}
    return {"num_workers": GPU_LOADER_WORKERS, "pin_memory": True}


def train_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The forward/backward arithmetic of a training step: ``fp32`` (autocast off) or ``bf16``
    autocast on ``device`` (weights, gradients and optimizer state stay float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
    sums = all_reduce_(
        torch.tensor([r.loss_sum, r.correct, r.count], dtype=torch.float64, device=device)
    )
    return EvalResult(float(sums[0]), int(sums[1]), int(sums[2]))

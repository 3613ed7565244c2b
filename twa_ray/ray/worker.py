"""Pieces shared by the Ray Train worker loops: data shards and loaders, mixed precision (the
collectives, summed evaluation and BN re-estimation, are the core's: :mod:`twa_ray.core.bn`,
:mod:`twa_ray.core.evaluate`)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["strided", "loader_options", "train_autocast"]

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

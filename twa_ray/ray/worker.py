"""Pieces shared by the Ray Train worker loops: data shards and loaders, mixed precision, summed
evaluation, fault injection."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from twa_ray.core.evaluate import EvalResult, evaluate

__all__ = ["strided", "loader_options", "train_autocast", "all_reduce_", "evaluate_sharded", "maybe_fail"]

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
    sums = all_reduce_(torch.tensor([r.loss_sum, r.correct, r.count], dtype=torch.float64, device=device))
    return EvalResult(float(sums[0]), int(sums[1]), int(sums[2]))


def maybe_fail(config: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Testing hook, called right after global step ``step``:

    - ``config['fail_at_step']``: the last rank raises once (an exception in the training loop);
    - ``config['kill_at_step']``: rank 0, the rank that writes candidates and checkpoints, kills
      its own process once with SIGKILL (a real process death, as from the OOM killer or a lost
      node: no exception, no cleanup).

    A marker file per kind (``fail_marker`` / ``kill_marker``) keeps the restarted attempt from
    failing again.
    """
    for key, marker_key, victim in (("fail_at_step", "fail_marker", world - 1), ("kill_at_step", "kill_marker", 0)):
        if config.get(key) != step or rank != victim:
            continue
        marker = config[marker_key]
        try:
            with open(marker, "x") as f:
                f.write(f"{key} {step} (rank {rank}, pid {os.getpid()})\n")
        except FileExistsError:
            continue
        if key == "kill_at_step":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected worker failure at step {step} (rank {rank}; marker {marker})")

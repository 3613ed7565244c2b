"""Evaluation of a model, and of a flat weight vector (load it, re-estimate BN, evaluate).

With W workers each evaluates its own part of the data and the sums add up
(:func:`evaluate_sharded`): loss :math:`= \\sum_r L_r / \\sum_r n_r`, accuracy likewise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from twa_ray.core.bn import all_reduce_, split_batch, update_bn
from twa_ray.core.layout import Layout, load_flat_

__all__ = ["BN_BATCH", "EVAL_BATCH", "EvalResult", "evaluate", "evaluate_sharded", "make_scorer"]

EVAL_BATCH = 1024
"""Batch of the evaluation passes on Ray workers (per worker) and in Tune trials (no gradients:
only memory bounds it)."""
BN_BATCH = 512
"""Batch of the BatchNorm re-estimation passes, and of the evaluation passes in one process
(``twa-ray average``, the driver's baselines). BN statistics are an average of per-batch
statistics, so the results depend on it: changing it changes the numbers."""


@dataclass(frozen=True)
class EvalResult:
    """Sums over a dataset (so that results of several workers add up)."""

    loss_sum: float
    correct: int
    count: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.count, 1)

    def __add__(self, other: EvalResult) -> EvalResult:
        return EvalResult(
            self.loss_sum + other.loss_sum, self.correct + other.correct, self.count + other.count
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | None = None,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
) -> EvalResult:
    """Summed loss, correct predictions and count of ``model`` in eval mode over ``loader``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in loader:
        x, y = split_batch(batch, device)
        if y is None:
            raise ValueError(
                "evaluation batches need targets: yield (x, y) or {'x': ..., 'y': ...}"
            )
        out = model(x)
        loss_sum += float(loss_fn(out, y, reduction="sum"))
        correct += int((out.argmax(dim=-1) == y).sum())
        count += int(y.numel())
    model.train(was_training)
    return EvalResult(loss_sum, correct, count)


def evaluate_sharded(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | None = None,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
) -> EvalResult:
    """:func:`evaluate` on this worker's part of the data, the sums added over all workers
    (``torch.distributed``; one worker: :func:`evaluate` itself).

    Pass the unwrapped model: workers see different shard sizes, and DDP forwards sync buffers.
    """
    r = evaluate(model, loader, device=device, loss_fn=loss_fn)
    sums = all_reduce_(
        torch.tensor([r.loss_sum, r.correct, r.count], dtype=torch.float64, device=device)
    )
    return EvalResult(float(sums[0]), int(sums[1]), int(sums[2]))


def make_scorer(
    model: nn.Module,
    layout: Layout,
    *,
    bn_loader: Iterable[Any] | None,
    eval_loader: Iterable[Any],
    device: torch.device | None = None,
) -> Callable[[torch.Tensor], float]:
    """A function ``theta -> accuracy``: loads ``theta`` into ``model``, re-estimates BN on
    ``bn_loader`` (skipped when None) and evaluates on ``eval_loader``."""

    def score(theta: torch.Tensor) -> float:
        load_flat_(model, theta, layout)
        if bn_loader is not None:
            update_bn(bn_loader, model, device=device)
        return evaluate(model, eval_loader, device=device).acc

    return score

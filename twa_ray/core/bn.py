"""BatchNorm re-estimation after averaging, and batch plumbing shared by the loops.

Averaged weights need fresh BatchNorm statistics: reset them and recompute a cumulative average
over the training data (``torch.optim.swa_utils.update_bn`` semantics, ``momentum=None``):

.. math::
    \\mu = \\frac{1}{N_b}\\sum_{b} \\mu_b, \\qquad \\sigma^2 = \\frac{1}{N_b}\\sum_b \\sigma_b^2

Unlike ``swa_utils.update_bn`` this accepts batches that are tensors, ``(x, y)`` tuples or dicts,
and returns the number of batches so that workers can combine their statistics: with W workers
(a ``torch.distributed`` group), worker r estimates over its own ``n_r`` batches and
:func:`reestimate_bn` all-reduces

.. math::
    \\mu = \\textstyle\\sum_r n_r \\mu_r \\big/ \\sum_r n_r \\quad\\text{(means and variances alike)},

the same cumulative average as one :func:`update_bn` over the union of the workers' batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "all_reduce_",
    "bn_state",
    "load_bn_state_",
    "reestimate_bn",
    "split_batch",
    "update_bn",
]


def split_batch(batch: Any, device: torch.device | None = None) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, targets)`` of a batch: a tensor, an ``(x, y, ...)`` sequence or a dict.

    Dicts use the keys ``"x"``/``"input"``/``"inputs"``/``"image"`` and ``"y"``/``"label"``/
    ``"labels"``/``"target"``; targets are ``None`` when absent.
    """
    x: Any
    y: Any
    if isinstance(batch, torch.Tensor):
        x, y = batch, None
    elif isinstance(batch, Mapping):
        x = next(
            (batch[k] for k in ("x", "input", "inputs", "image", "images") if k in batch), None
        )
        y = next(
            (batch[k] for k in ("y", "label", "labels", "target", "targets") if k in batch), None
        )
        if x is None:
            raise ValueError(
                f"dict batch has keys {sorted(batch)}; name the input 'x' (or 'input', 'image')"
            )
    elif isinstance(batch, (tuple, list)) and batch:
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        raise ValueError(
            f"cannot read a batch of type {type(batch).__name__}; use a tensor, tuple or dict"
        )
    if device is not None:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True) if isinstance(y, torch.Tensor) else y
    return x, y


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    *,
    device: torch.device | None = None,
    max_batches: int | None = None,
) -> int:
    """Reset and re-estimate BatchNorm running statistics; returns the number of batches seen.

    Restores the training mode and the momenta of the BN layers afterwards.
    """
    bns = bn_modules(model)
    if not bns:
        return 0
    momenta = {m: m.momentum for m in bns}
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches
    model.train()
    num = 0
    for batch in loader:
        if max_batches is not None and num >= max_batches:
            break
        x, _ = split_batch(batch, device)
        model(x)
        num += 1
    for m in bns:
        m.momentum = momenta[m]
    model.train(was_training)
    return num


def bn_state(model: nn.Module) -> torch.Tensor:
    """All BN running means and variances, concatenated: (sum of 2 x channels,) float64."""
    parts = []
    for m in bn_modules(model):
        assert m.running_mean is not None and m.running_var is not None
        parts += [m.running_mean.double().flatten(), m.running_var.double().flatten()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def load_bn_state_(model: nn.Module, state: torch.Tensor) -> None:
    """Inverse of :func:`bn_state`: write concatenated running statistics back into the model."""
    bufs = [b for m in bn_modules(model) for b in (m.running_mean, m.running_var) if b is not None]
    needed = sum(b.numel() for b in bufs)
    if needed != state.numel():
        raise ValueError(f"BN state has {state.numel()} values, the model needs {needed}")
    offset = 0
    for buf in bufs:
        n = buf.numel()
        buf.copy_(state[offset : offset + n].view_as(buf))
        offset += n


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is running (the workers' collectives)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_(
    t: torch.Tensor,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Reduce ``t`` (sum; or ``op``) over the workers of ``group`` in place (a no-op without a
    process group)."""
    if distributed():
        dist.all_reduce(t, op=op, group=group)
    return t


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | None = None,
    max_batches: int | None = None,
) -> torch.Tensor:
    """:func:`update_bn` on this worker's batches, then the batch-weighted average over all
    workers (see the module docstring), loaded into ``model``; returns it (:func:`bn_state`
    order, float64). Without a process group: :func:`update_bn` alone."""
    n = update_bn(loader, model, device=device, max_batches=max_batches)
    state = bn_state(model)
    if not distributed() or state.numel() == 0:
        return state
    sums = torch.cat(
        [state * n, torch.tensor([float(n)], dtype=torch.float64, device=state.device)]
    )
    dist.all_reduce(sums)
    if sums[-1] <= 0:
        raise ValueError("no batches to re-estimate BatchNorm statistics: the train split is empty")
    combined = sums[:-1] / sums[-1]
    load_bn_state_(model, combined)
    return combined

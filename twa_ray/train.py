"""TWA in any Ray Train loop: snapshot candidates while training, learn the average after.

Two calls with stable names, the same ones ``twa-ray run``'s own sampling loop makes::

    import twa_ray.train

    def train_loop_per_worker(config):          # your loop, on every Ray Train worker
        ...                                     # forward, backward, optimizer.step()
        if step % 50 == 0:
            twa_ray.train.snapshot(model, config["store"], step=step)   # rank 0 writes

    TorchTrainer(train_loop_per_worker, ...).fit()
    twa = twa_ray.train.learn(MyNet(), store, val_loader)   # TWA-v: alpha on held-out batches

:func:`snapshot` writes the model's trainable parameters (unwrapped from DDP) into a
:class:`~twa_ray.store.CandidateStore` at any storage URI (local path, ``s3://``, ``gs://``,
any ``pyarrow.fs`` URI) as candidate ``step{step:08d}``, on world rank 0 only. It is idempotent
by step: a run restarted from its last checkpoint replays the same steps and rewrites the same
names (an atomic replace), so no candidate is lost or duplicated. :func:`learn` then fits the
coefficients with the core engine (:class:`~twa_ray.core.twa.TWA`):

.. math::
    \\theta(\\alpha) = o + \\textstyle\\sum_{k,l} \\alpha_{k,l} B_{k,l},
    \\qquad \\alpha \\leftarrow \\mathrm{step}(\\alpha, B\\,\\nabla_\\theta \\ell)

From the command line, ``twa-ray average --store URI --model pkg.mod:fn --dataset pkg.mod:fn``
does the second half for a project-style model and dataset. This module imports no Ray at import
time and needs neither Lightning nor Transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from twa_ray.core.twa import TWA, TWAConfig
from twa_ray.store.snapshots import Snapshotter, candidate_name, snapshot
from twa_ray.store.store import CandidateStore

__all__ = ["Snapshotter", "candidate_name", "learn", "snapshot"]


def learn(
    model: nn.Module,
    store_uri: str,
    loader: Iterable[Any],
    *,
    config: TWAConfig | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    bn_loader: Iterable[Any] | None = None,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    **overrides: Any,
) -> TWA:
    """Learn the averaging coefficients of the candidates in ``store_uri`` and load the
    averaged weights ``theta(alpha)`` into ``model``.

    Args:
        model: a fresh instance of the trained architecture (its layout must match the store's).
        store_uri: the store :func:`snapshot` wrote.
        loader: batches ``(x, y)`` for the coefficients: training data (TWA-t) or held-out data
            the run never trained on (TWA-v).
        config: subspace, quantization, optimizer and schedule (:class:`TWAConfig`); keyword
            ``overrides`` replace its fields (``bits=8``, ``lr=0.1``, ...).
        epochs, steps: how long (default ``config.epochs`` passes over ``loader``).
        bn_loader: training batches to re-estimate BatchNorm statistics at the result.
        loss_fn: ``loss_fn(model(x), y)``.

    Returns:
        The fitted :class:`~twa_ray.core.twa.TWA` engine (``.alpha``, ``.theta``).
    """
    store = CandidateStore(store_uri)
    if len(store) == 0:
        raise ValueError(
            f"candidate store {store_uri!r} is empty; snapshot candidates into it first"
        )
    twa = TWA(model, store, config=config, loss_fn=loss_fn, **overrides)
    twa.fit(loader, epochs=epochs, steps=steps)
    if bn_loader is not None:
        twa.update_bn(bn_loader)
    return twa

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

On a model sharded with FSDP2 (``fully_shard``: DTensor parameters) both calls are collectives
run on every rank and nothing is gathered: each rank writes its rows of a candidate, and
:func:`learn` builds its columns :math:`B_r` from its rows of the candidates
(``CandidateStore.read_local``), fits alpha with
:math:`a = \\sum_r B_r g_r` (g_r: its gradient shard; an all-reduce of K·L numbers) and
leaves :math:`\\theta_r = o_r + B_r^\\top \\alpha` in its shards
(:class:`~twa_ray.core.sharded_twa.ShardedTWA`): the alpha of the unsharded :func:`learn` over
the ranks' batches joined.

From the command line, ``twa-ray average --store URI --model pkg.mod:fn --dataset pkg.mod:fn``
does the second half for a project-style model and dataset. This module imports no Ray at import
time and needs neither Lightning nor Transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from twa_ray.core.loop import total_steps
from twa_ray.core.sharded import LocalShards
from twa_ray.core.sharded_twa import ShardedTWA, build_sharded_subspace
from twa_ray.core.twa import TWA, TWAConfig
from twa_ray.store.snapshots import Snapshotter, candidate_name, is_sharded, snapshot
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

    On a ``fully_shard``-ed model call it on every rank with that rank's batches (a collective):
    each rank reads only its rows of the candidates and keeps its shards of theta; every rank
    runs as many steps (the fewest any rank's ``loader`` gives) and returns the same alpha.

    Args:
        model: a fresh instance of the trained architecture (its layout must match the store's),
            or one sharded with FSDP2 (``fully_shard`` on every rank).
        store_uri: the store :func:`snapshot` wrote.
        loader: batches ``(x, y)`` for the coefficients: training data (TWA-t) or held-out data
            the run never trained on (TWA-v).
        config: subspace, quantization, optimizer and schedule (:class:`TWAConfig`); keyword
            ``overrides`` replace its fields (``bits=8``, ``lr=0.1``, ...).
        epochs, steps: how long (default ``config.epochs`` passes over ``loader``).
        bn_loader: training batches to re-estimate BatchNorm statistics at the result (sharded:
            as many batches on every rank; the statistics are averaged over all ranks').
        loss_fn: ``loss_fn(model(x), y)``.

    Returns:
        The fitted :class:`~twa_ray.core.twa.TWA` engine (``.alpha``, ``.theta``).
    """
    sharded = is_sharded(model)
    if sharded:  # rank 0 has committed the last snapshot: every rank lists the same candidates
        dist.barrier()
    store = CandidateStore(store_uri)
    if len(store) == 0:
        raise ValueError(
            f"candidate store {store_uri!r} is empty; snapshot candidates into it first"
        )
    if sharded:
        twa: TWA = _sharded_twa(model, store, replace(config or TWAConfig(), **overrides), loss_fn)
        steps = _common_steps(loader, twa.config.epochs if epochs is None else epochs, steps)
    else:
        twa = TWA(model, store, config=config, loss_fn=loss_fn, **overrides)
    twa.fit(loader, epochs=epochs, steps=steps)
    if bn_loader is not None:
        twa.update_bn(bn_loader)
    return twa


def _sharded_twa(
    model: nn.Module, store: CandidateStore, config: TWAConfig, loss_fn: Callable[..., torch.Tensor]
) -> ShardedTWA:
    """:class:`ShardedTWA` over this rank's columns B_r, built from its rows of the candidates
    (a collective: the affine variant's norms and the span's QR are reduced across ranks)."""
    sub = build_sharded_subspace(store, LocalShards.from_module(model), config)
    return ShardedTWA(model, sub, config=config, loss_fn=loss_fn)


def _common_steps(loader: Iterable[Any], epochs: float, steps: int | None) -> int:
    """The steps every rank runs: ``steps``, else the fewest that ``epochs`` passes over any
    rank's ``loader`` give (one MIN all-reduce; FSDP's forward is a collective)."""
    if steps is not None:
        return steps
    per = getattr(loader, "steps_per_pass", None) if hasattr(loader, "batches") else None
    per = len(loader) if per is None and hasattr(loader, "__len__") else per
    if not per:
        raise ValueError("loader has no length: pass steps= (the same on every rank)")
    n = torch.tensor([total_steps(epochs, per)])
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n.item())

"""The coefficient phase on an FSDP2-sharded model (``sampling.strategy = "fsdp"``).

Every rank shards the model (:func:`~twa_ray.ray.fsdp.shard_model`) and builds its columns
:math:`B_r` of the subspace from its candidate shards in the store
(:meth:`~twa_ray.store.store.CandidateStore.read_local`,
:func:`~twa_ray.core.sharded_twa.build_sharded_subspace`): no rank builds or ships the whole B.
:class:`~twa_ray.core.sharded_twa.ShardedTWA` fits alpha with :math:`a = \\sum_r B_r g_r` (a SUM
all-reduce of R·L numbers); alpha is the same on every rank, so the checkpoints of
:mod:`twa_ray.ray.coeff_group` (rank 0's alpha, optimizer and step) resume as they do
data-parallel, B rebuilt from the store. Evaluation pads with empty batches
(:func:`~twa_ray.ray.fsdp.even_batches`); BatchNorm is re-estimated over as many batches on every
rank (the smallest shard's, :func:`~twa_ray.ray.fsdp.min_batches`). The final checkpoint holds
each method's :math:`\\theta_r = o_r + B_r^\\top \\alpha` per rank (``theta-<rank>.pt``); the
driver joins them (:func:`read_theta`), nothing is gathered on a worker.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from twa_ray.core.evaluate import EVAL_BATCH
from twa_ray.core.host import standard_evaluation
from twa_ray.core.layout import Layout
from twa_ray.core.sharded import LocalShards
from twa_ray.core.sharded_subspace import ShardedSubspace
from twa_ray.core.sharded_twa import build_sharded_subspace
from twa_ray.core.twa import TWAConfig
from twa_ray.ray.fsdp import (
    even_batches,
    full_from_shards,
    min_batches,
    shard_model,
)
from twa_ray.ray.worker import strided
from twa_ray.store.store import CandidateStore

__all__ = ["REASON", "read_theta", "sharded_evaluation", "sharded_result", "sharded_setup"]

REASON = "strategy fsdp: each rank builds and holds its columns of B"


def theta_file(rank: int) -> str:
    """Rank ``rank``'s file of every method's theta shard in the final checkpoint."""
    return f"theta-{rank:05d}.pt"


def sharded_setup(
    store_uri: str, model: nn.Module, config: TWAConfig, device: torch.device
) -> tuple[nn.Module, ShardedSubspace, dict[str, Any]]:
    """``model`` sharded on ``device``, this rank's part of the subspace of ``config`` built from
    its candidate shards (a collective: every rank calls it), and the result's ``extra``."""
    model = shard_model(model, device)
    shards = LocalShards.from_module(model)
    sub = build_sharded_subspace(CandidateStore(store_uri), shards, config).to(device)
    extra = {
        "basis_placement": "fsdp",
        "basis_placement_reason": REASON,
        "basis_held_bytes": sub.held_bytes,
        "wire_bytes_per_step": 4 * sub.num_rows * sub.num_blocks,
    }
    return model, sub, extra


def sharded_evaluation(
    job: Any,
    splits: Any,
    evaluated: dict[str, Any],
    rank: int,
    world: int,
    loader_kw: dict[str, Any],
) -> Any:
    """:func:`~twa_ray.core.host.standard_evaluation` with as many forwards on every rank:
    BatchNorm over the smallest train shard's batch count, the ``evaluated`` splits (name ->
    dataset: val, test, the hold part of val) padded."""
    from torch.utils.data import DataLoader

    batch = job.group.batch_size // world
    cap = min_batches(len(splits.train), world, batch)
    bn = cap if job.group.bn_batches is None else min(cap, job.group.bn_batches)
    evals = {
        s: even_batches(
            DataLoader(strided(ds, rank, world), batch_size=EVAL_BATCH, **loader_kw),
            len(ds),
            world,
            EVAL_BATCH,
        )
        for s, ds in evaluated.items()
    }
    train = DataLoader(strided(splits.train, rank, world), batch_size=batch, **loader_kw)
    return standard_evaluation(train, evals, bn_batches=bn)


def sharded_result(
    rank: int,
    world: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: Any,
    modes: tuple[str, ...],
    sub: ShardedSubspace,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This rank's theta file of the final checkpoint and, on rank 0, the result (every mode's
    fields, BN statistics, the layout to join the shards, the summary; None elsewhere)."""
    files: dict[str, Any] = {theta_file(rank): {k: v["theta"] for k, v in weights.items()}}
    if rank != 0:
        return files, None
    layout = sub.shards.layout
    quant = sub.quant_error
    result = {
        "modes": {
            m: {**state.done[m], "swa": state.swa, "restarts": state.restarts} for m in modes
        },
        "weights": {k: {"bn_state": v["bn_state"]} for k, v in weights.items()},
        "theta_shards": {
            "world": world,
            "names": list(layout.names),
            "shapes": [list(s) for s in layout.shapes],
            "dtypes": list(layout.dtypes),
        },
        "subspace": {
            "kind": sub.kind,
            "num_rows": sub.num_rows,
            "num_blocks": sub.num_blocks,
            "numel": sub.numel,
            "num_candidates": sub.num_candidates,
            "dropped": list(sub.dropped),
            "quant_error_max": float(quant.max()) if quant is not None and quant.numel() else 0.0,
        },
        "block_labels": list(sub.blocks.labels),
    }
    return files, result


def read_theta(out: dict[str, Any], local_dir: str) -> None:
    """Join the per-rank theta shards of a sharded final checkpoint into ``out["weights"]``
    (in place; the driver's one gather, from files)."""
    spec = out.pop("theta_shards")
    layout = Layout(
        tuple(spec["names"]), tuple(tuple(s) for s in spec["shapes"]), tuple(spec["dtypes"])
    )
    parts = [
        torch.load(os.path.join(local_dir, theta_file(r)), map_location="cpu", weights_only=True)
        for r in range(spec["world"])
    ]
    for name, w in out["weights"].items():
        w["theta"] = full_from_shards(layout, [p[name] for p in parts])

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
rank (the smallest shard's, :func:`~twa_ray.ray.fsdp.min_batches`). Each method's
:math:`\\theta_r = o_r + B_r^\\top \\alpha` is written sharded into the final checkpoint
(:mod:`twa_ray.ray.fsdp_output`: each rank its whole tensors, an index): no rank and not the
driver joins the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from twa_ray.core.evaluate import EVAL_BATCH
from twa_ray.core.host import standard_evaluation
from twa_ray.core.sharded import LocalShards
from twa_ray.core.sharded_subspace import ShardedSubspace
from twa_ray.core.sharded_twa import build_sharded_subspace
from twa_ray.core.twa import TWAConfig
from twa_ray.ray.fsdp import even_batches, min_batches, shard_model
from twa_ray.ray.fsdp_output import output_files
from twa_ray.ray.worker import strided
from twa_ray.store.store import CandidateStore

__all__ = ["REASON", "sharded_evaluation", "sharded_result", "sharded_setup"]

REASON = "strategy fsdp: each rank builds and holds its columns of B"


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
    w: Any,
    weights: dict[str, dict[str, torch.Tensor]],
    state: Any,
    modes: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This rank's files of every method's model in the final checkpoint
    (:func:`~twa_ray.ray.fsdp_output.output_files`: a collective) and, on rank 0, the result
    (every mode's fields, BN statistics, which methods were written sharded, the summary; None
    elsewhere). ``w``: the coefficient worker (rank, model, placement)."""
    sub: ShardedSubspace = w.placement
    files = output_files(w.model, sub.shards, weights)
    if w.rank != 0:
        return files, None
    quant = sub.quant_error
    result = {
        "modes": {
            m: {**state.done[m], "swa": state.swa, "restarts": state.restarts} for m in modes
        },
        "weights": {k: {"bn_state": v["bn_state"]} for k, v in weights.items()},
        "sharded_output": {"world": w.world, "methods": sorted(weights)},
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

"""One Ray Train worker group per ``twa-ray run``: sampling -> basis -> coefficients in one fit.

The workers run the phases in turn, each from the module that defines it (the same functions
run alone in :func:`~twa_ray.ray.sampling.run_sampling` and :func:`~twa_ray.ray.coeff_group.run_twa`):

1. sampling (:func:`~twa_ray.ray.sampling.sampling_phase`): SGD over ``sample_epochs``, the
   candidates written to the store, a checkpoint at the end;
2. basis (``strategy='fsdp'``: none here, each rank builds its columns of B in the coefficient
   phase, :mod:`twa_ray.ray.fsdp_coeff`): rank 0 builds the quantized subspace from the store with the core
   (:func:`~twa_ray.ray.shards.put_subspace`: its shards go into the object store, owned by rank 0
   while the group lives), decides where B lives (:func:`~twa_ray.ray.coeff_group.choose_placement`
   with rank 0's memory) and shares both as one ``ObjectRef`` through
   ``ray.train.collective.broadcast_from_rank_zero``; the other ranks map the same shards;
3. coefficients (:func:`~twa_ray.ray.coeff_group.coeff_phase`): TWA-t and/or TWA-v, BN
   re-estimation, the SWA point's evaluation; the final checkpoint holds every method's weights
   (flat theta + BN statistics), so the driver writes its outputs without B.

Every checkpoint's ``phase.json`` says which phase it holds and what is done. A restart (a lost
worker, ``--resume``) continues there: in the sampling phase from its epoch; in the coefficient
phase B is rebuilt from the store (the same candidates give the same bits) and the mode in flight
resumes from its step. Coefficient checkpoints carry the sampling phase's final files (loop state,
model and EMAs), so the final checkpoint is all the driver reads.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from twa_ray.config import DataConfig, SamplingConfig
from twa_ray.core.layout import Layout
from twa_ray.core.twa import TWAConfig
from twa_ray.data.stream import StreamedTrain
from twa_ray.ray.coeff_group import (
    CoeffGroupConfig,
    CoeffJob,
    CoeffOutcome,
    PlacementChoice,
    choose_placement,
    coeff_phase,
    read_outcome,
)
from twa_ray.ray.fsdp_coeff import REASON
from twa_ray.ray.group import PHASE_FILE, TIMER, checkpoint_phase, fit_group, load_worker_splits
from twa_ray.ray.sampling import (
    SamplingJob,
    SamplingResult,
    phase_carry,
    prepare_run,
    read_sampling,
    read_sampling_files,
    sampling_phase,
)
from twa_ray.ray.shards import ShardedSubspace, put_subspace
from twa_ray.store.store import CandidateStore

__all__ = ["RunJob", "RunOutcome", "run_path", "run_loop_per_worker"]


@dataclass(frozen=True)
class RunJob:
    """What every worker of a run receives: the sampling job and the coefficient phase's
    settings (the subspace and its placement are made in the group)."""

    sampling: SamplingJob
    twa: TWAConfig
    group: CoeffGroupConfig


@dataclass
class RunOutcome:
    """What :func:`run_path` returns: the sampling result, the coefficient outcome (results,
    every method's weights, the subspace) and the group's seconds per phase (``wall_s``)."""

    sampled: SamplingResult
    coeff: CoeffOutcome
    wall_s: dict[str, float] = field(default_factory=dict)


def run_path(
    data: DataConfig,
    sampling: SamplingConfig,
    twa: TWAConfig,
    group: CoeffGroupConfig,
    *,
    store_uri: str,
    run_dir: str,
    run_id: str,
    progress: bool = True,
    data_ref: Any = None,
) -> RunOutcome:
    """Sampling, the basis and the coefficients of ``group.modes`` in ONE Ray Train worker
    group (``run_dir/ray_train/twa_<run_id>``; the same ``run_id`` and ``run_dir`` resume).
    Arguments as :func:`~twa_ray.ray.sampling.run_sampling` and
    :func:`~twa_ray.ray.coeff_group.run_twa`.

    ``wall_s``: ``group`` (the driver's seconds of the fit, retries included), ``worker_startup``
    (the last attempt's fit start to rank 0's first line: process start, imports, process group)
    and rank 0's seconds per phase (``<phase>/<part>``, summed over the attempts).
    """
    rd = prepare_run(data, sampling, store_uri=store_uri, run_dir=run_dir, run_id=run_id)
    job = RunJob(SamplingJob(data, sampling, store_uri, run_id, progress, data_ref), twa, group)
    started: list[float] = []  # each attempt's fit start
    t0 = time.perf_counter()
    result = fit_group(
        run_loop_per_worker,
        job,
        name=f"twa_{run_id}",
        run_dir=rd,
        num_workers=sampling.num_workers,
        cpus_per_worker=sampling.cpus_per_worker,
        use_gpu=sampling.use_gpu,
        max_failures=sampling.max_failures,
        started=started,
        data_ref=data_ref,
    )
    wall = time.perf_counter() - t0
    with result.checkpoint.as_directory() as d:  # fetched once (a download on remote storage)
        coeff = read_outcome(result.checkpoint, wall, local_dir=d)
        sampled = read_sampling(result.checkpoint, job.sampling, wall, local_dir=d)
        with open(os.path.join(d, PHASE_FILE)) as f:
            phase = json.load(f)
    seconds = {"group": wall, "worker_startup": max(phase["started_at"] - started[-1], 0.0)}
    return RunOutcome(sampled, coeff, {**seconds, **phase["wall_s"]})


def run_loop_per_worker(job: RunJob) -> None:
    """Ray Train ``train_loop_per_worker`` of :func:`run_path` (see the module docstring)."""
    import ray.train

    phase = checkpoint_phase()
    if phase is not None:
        TIMER.resume(phase["wall_s"])
    rank = ray.train.get_context().get_world_rank()
    sampling = phase is None or phase["phase"] == "sampling"
    if sampling:
        w, state = sampling_phase(job.sampling)
        # a streamed training split is loaded by the coefficient phase (it reads train by index)
        splits = None if isinstance(w.splits.train, StreamedTrain) else w.splits
        layout = Layout.from_module(w.inner)
        carry = phase_carry(w, state)
    else:  # a restart in the coefficient phase
        splits, layout = _data_and_layout(job.sampling.data, job.sampling.data_ref)
        fsdp = job.sampling.sampling.strategy == "fsdp"  # every rank carries its shards
        carry = _carried(rank) if rank == 0 or fsdp else {}
    TIMER.phase = "coefficients"
    if job.sampling.sampling.strategy == "fsdp":  # each rank builds its columns of B
        coeff = CoeffJob(
            job.sampling.data,
            job.twa,
            job.group,
            None,
            PlacementChoice("shard", REASON),
            fsdp_store=job.sampling.store_uri,
        )
    else:
        with TIMER("basis"):
            sharded, placement = _share_basis(job, layout, rank)
        coeff = CoeffJob(job.sampling.data, job.twa, job.group, sharded, placement)
    coeff_phase(coeff, splits=splits, carry=carry, resume=not sampling)


def _data_and_layout(data: DataConfig, data_ref: Any) -> tuple[Any, Layout]:
    """The dataset and the model's layout (a restart in the coefficient phase builds B again)."""
    from twa_ray.models import build_model

    splits = load_worker_splits(data, data_ref)
    model = build_model(data.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
    return splits, Layout.from_module(model)


def _carried(rank: int) -> dict[str, Any]:
    """This rank's files of the sampling phase in the checkpoint resumed from (carried to the
    next ones: rank 0's, or under fsdp every rank's shards)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() as d:
        return read_sampling_files(d, rank)


def _share_basis(job: RunJob, layout: Layout, rank: int) -> tuple[ShardedSubspace, PlacementChoice]:
    """Rank 0 builds B from the store, puts its shards in the object store and decides the
    placement; every rank gets both through one broadcast ``ObjectRef``."""
    import ray
    import ray.train.torch
    from ray.train.collective import broadcast_from_rank_zero

    handle = None
    if rank == 0:
        store = CandidateStore(job.sampling.store_uri)
        sharded = put_subspace(store, layout, job.twa)
        device = ray.train.torch.get_device()
        placement = choose_placement(sharded, job.twa, job.group, device)
        handle = [ray.put((sharded, placement))]  # in a list: Ray passes it on unresolved
    (ref,) = broadcast_from_rank_zero(handle)
    sharded, placement = ray.get(ref)
    return sharded, placement

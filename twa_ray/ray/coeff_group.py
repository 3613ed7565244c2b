"""The coefficient phase on N Ray Train workers: all-reduce K·L coefficients, not D gradients.

Every worker holds a replica of alpha and a zero-copy view of the packed basis B (object store,
:mod:`twa_ray.ray.shards`). Per step, on worker r with its batch:

.. math::
    a^{(r)} = B\\,\\nabla_\\theta \\ell(\\theta(\\alpha); \\text{batch}_r), \\qquad
    a = \\frac1N \\sum_r a^{(r)} \\ \\text{(all-gather of } K \\cdot L \\text{ float32)}, \\qquad
    \\alpha \\leftarrow \\mathrm{step}(\\alpha, a), \\quad \\theta = o + \\textstyle\\sum \\alpha B

All workers apply the same ``a`` to the same optimizer state, so their alphas stay bit-identical
(checked at the end). That is ``basis_placement='replicate'``; with ``'shard'`` each worker holds
only its shards of B (B / N per worker and device) and the step trades gradient and weight slices
instead (:mod:`twa_ray.core.placement`; the same alpha bit for bit); ``'auto'`` shards when B and
the model do not fit comfortably in a worker's memory. The choice, its reason, the bytes of B
held per worker and sent per step are in every result's ``extra``.

The steps are the core's :class:`~twa_ray.core.loop.CoefficientLoop` (the same loop as
``TWA.fit``, ``twa-ray average`` and a Tune trial); this module is its Ray shell: the placement
(decided once, on the driver for :func:`run_twa` or on rank 0 for a ``twa-ray run``'s one
worker group, :mod:`twa_ray.ray.run_loop`, and passed to the workers in the :class:`CoeffJob`), the sums
all-reduced, checkpoints through Ray Train, the BN and evaluation collectives. Under
``strategy='fsdp'`` the model is sharded and each rank builds its own columns of B
(:mod:`twa_ray.ray.fsdp_coeff`, ``CoeffJob.fsdp_store``): the same loop, modes and checkpoints.

TWA-t optimizes on the train split, TWA-v on the held-out val split less its *hold* part
(``TWAConfig.hold_frac``, :func:`~twa_ray.core.start.split_held_out`: the saved model is chosen
there); both take ``round(epochs * steps per training epoch)`` steps (TWA-v cycles its smaller
split). Then:

1. BatchNorm statistics are re-estimated on the whole train split: every worker runs
   ``update_bn`` over its strided shard (``n_r`` batches); the cumulative averages combine as
   :math:`\\sum_r n_r \\mu_r / \\sum_r n_r` (all-reduce), the same as one ``update_bn`` over the
   union of the shards' batches;
2. val, test and hold are evaluated on strided shards, sums all-reduced;
3. the SWA point (alpha0) gets the same BN + evaluation (``eval_swa``), for the report.

Fault tolerance: rank 0 checkpoints alpha + optimizer + schedule + step at the end of a pass
over the fit split or every ``checkpoint_every`` steps, at most once per
``checkpoint_interval_s`` seconds, and at each mode's end; with ``max_failures`` Ray restarts all
workers from the last checkpoint, and the data order (a function of seed, pass and step)
replays exactly.

>>> sharded = put_subspace(store, layout, TWAConfig(bits=4))               # doctest: +SKIP
>>> res = run_twa(sharded, DataConfig(), TWAConfig(bits=4), CoeffGroupConfig(), run_dir="runs/a")  # doctest: +SKIP
>>> res["v"].test_acc, res["v"].swa["test_acc"]                            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any

import torch

from twa_ray.config import DataConfig, SamplingConfig
from twa_ray.core.bn import load_bn_state_
from twa_ray.core.checks import Range, check_fields
from twa_ray.core.evaluate import EVAL_BATCH
from twa_ray.core.host import MODES, build_loop, standard_evaluation
from twa_ray.core.kernels.cpu import kernel_info
from twa_ray.core.layout import Layout, load_flat_
from twa_ray.core.loop import CoefficientLoop, CoeffState, LoopHooks
from twa_ray.core.placement import PlacementKind, choose
from twa_ray.core.sharded_twa import ShardedTWA
from twa_ray.core.start import split_held_out
from twa_ray.core.twa import TWA, TWAConfig
from twa_ray.ray.data_root import check_data_root_on_nodes
from twa_ray.ray.faults import inject
from twa_ray.ray.fsdp_coeff import sharded_evaluation, sharded_result, sharded_setup
from twa_ray.ray.group import (
    TIMER,
    CheckpointClock,
    check_run_id,
    fit_group,
    load_worker_splits,
    report,
)
from twa_ray.ray.shards import ShardedSubspace, group_capacity
from twa_ray.ray.worker import loader_options, strided
from twa_ray.storage import Storage, open_storage

__all__ = ["MODES", "CoeffGroupConfig", "TWAResult", "run_twa"]

log = logging.getLogger(__name__)

STATE_FILE = "coeff.pt"  # PhaseState: finished modes, the loop state of the mode in flight
RESULT_FILE = "result.pt"  # the final TWAResult fields, every method's weights, the subspace


@dataclass(frozen=True, kw_only=True)
class CoeffGroupConfig:
    """How the coefficient phase runs on Ray Train (the loop's own settings are the TWAConfig)."""

    modes: tuple[str, ...] = MODES
    """"t" (coefficients fitted on the train split) and/or "v" (on the held-out val split)."""
    num_workers: Annotated[int, Range(ge=1)] = 2
    """Ray Train workers."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    use_gpu: bool = False
    """One GPU per worker."""
    batch_size: int = 128
    """Global batch of a coefficient step (batch_size // num_workers per worker)."""
    bn_batches: Annotated[int, Range(ge=1)] | None = None
    """Cap on each worker's BN re-estimation batches (None: its whole train shard)."""
    checkpoint_every: Annotated[int, Range(ge=1)] = 50
    """Rank 0 checkpoints every this many steps and at every pass end..."""
    checkpoint_interval_s: Annotated[float, Range(ge=0)] = 10.0
    """...at most once per this many seconds (0: every time); each mode's end always does."""
    max_failures: Annotated[int, Range(ge=0)] = 1
    """Worker-group failures survived by restarting from the last checkpoint."""
    eval_swa: bool = True
    """Also evaluate the SWA point (alpha0; BN re-estimated the same way)."""
    progress: bool = True
    """Rank 0 logs one line per pass."""

    def __post_init__(self) -> None:
        errors = []
        if not self.modes or any(m not in MODES for m in self.modes):
            errors.append(f"modes={tuple(self.modes)!r}: use a non-empty subset of {MODES}")
        if self.batch_size < self.num_workers:
            errors.append(
                f"batch_size={self.batch_size}: must be >= num_workers={self.num_workers}"
            )
        check_fields(self, "coefficient-phase config", errors)  # and the bounds declared above

    @classmethod
    def of_sampling(cls, s: SamplingConfig, modes: tuple[str, ...]) -> CoeffGroupConfig:
        """The group of a ``twa-ray run``: the sampling phase's workers, batch and failures."""
        return cls(
            modes=modes,
            num_workers=s.num_workers,
            cpus_per_worker=s.cpus_per_worker,
            use_gpu=s.use_gpu,
            batch_size=s.batch_size,
            max_failures=s.max_failures,
            checkpoint_interval_s=s.checkpoint_interval_s,
        )


@dataclass(frozen=True)
class PlacementChoice:
    """Where B lives in the group (decided once, on the driver) and why."""

    kind: PlacementKind
    reason: str


@dataclass(frozen=True)
class CoeffJob:
    """What every coefficient worker receives (pickled as it is)."""

    data: DataConfig
    twa: TWAConfig
    group: CoeffGroupConfig
    sharded: ShardedSubspace | None
    placement: PlacementChoice
    data_ref: Any = None
    """The driver's dataset in the object store (:func:`~twa_ray.ray.group.ship_splits`), or
    None: each worker loads it."""
    fsdp_store: str | None = None
    """``strategy='fsdp'``: the candidate store; every rank shards the model and builds its
    columns of B from its candidate shards (:mod:`twa_ray.ray.fsdp_coeff`); ``sharded`` is
    then None."""


@dataclass
class TWAResult:
    """The outcome of one coefficient phase (one mode).

    Attributes:
        mode: "t" (coefficients learned on train data) or "v" (on held-out val data).
        alpha: (R, L) float32 final coefficients; ``theta = o + sum alpha B``
            (:meth:`theta` rebuilds it from the subspace).
        bn_state: float64 BatchNorm running statistics at ``theta`` (``core.bn.bn_state`` order),
            re-estimated on the whole train split across workers.
        val_loss, val_acc, test_loss, test_acc: at ``theta`` with ``bn_state``.
        hold_loss, hold_acc: the same on the hold part of val (None with ``hold_frac=0``).
        swa: the same metrics at the SWA point (alpha0, BN re-estimated), or None.
        history: one dict per (possibly partial) pass over the fit split (train for TWA-t, val
            for TWA-v): ``epoch`` (training-data epochs of budget so far), ``step``, ``pass``,
            ``lr``, ``loss``, ``acc`` (on the fit split, all workers).
        steps: coefficient steps taken, ``round(epochs * steps_per_epoch)`` in both modes.
        steps_per_epoch: steps per epoch of the *training* data (the budget unit): TWA-v takes
            as many steps as TWA-t, cycling the held-out split.
        steps_per_pass: steps per pass over the fit split.
        bytes_allreduced_per_step: bytes of the per-step all-reduce (K·L·4).
        num_workers: N.
        alpha_identical: every worker ended with bit-identical alpha (sha256 compared).
        restarts: worker-group restarts from a checkpoint in the lineage of the final checkpoint
            (failures survived; a checkpoint reported just before a worker died can be lost with
            it, and the failures since the checkpoint before then count once).
        wall_time_s: driver seconds of the whole Ray Train run (all modes: one worker group);
            ``train_time_s``: seconds of this mode's coefficient loop (rank 0, last attempt).
            ``mode_time_s``: the whole mode (loop, BN, evaluation; rank 0, last attempt); the
            SWA point's evaluation is ``swa["time_s"]``, the rest of the wall time start-up.
        checkpoint_path: the final Ray Train checkpoint (holds ``result.pt`` and ``coeff.pt``).
        weights: the final weights and BN statistics (:class:`MethodWeights`): no subspace is
            needed to load them.
    """

    mode: str
    alpha: torch.Tensor
    bn_state: torch.Tensor
    val_loss: float
    val_acc: float
    test_loss: float
    test_acc: float
    swa: dict[str, float] | None
    history: list[dict[str, float]]
    steps: int
    steps_per_epoch: int
    bytes_allreduced_per_step: int
    num_workers: int
    alpha_identical: bool
    restarts: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    mode_time_s: float = 0.0
    checkpoint_path: str | None = None
    steps_per_pass: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    weights: MethodWeights | None = None
    hold_loss: float | None = None
    hold_acc: float | None = None

    def theta(self, sharded: ShardedSubspace | None = None) -> torch.Tensor:
        """The final weights ``o + sum alpha B`` as a flat (D,) float32 tensor (the workers'
        own, or rebuilt from ``sharded`` when given)."""
        if sharded is None:
            assert self.weights is not None and self.weights.theta is not None, "pass the subspace"
            return self.weights.theta
        return sharded.materialize().reconstruct(self.alpha.float().contiguous())

    def load_into_(
        self, model: torch.nn.Module, sharded: ShardedSubspace | None = None
    ) -> torch.nn.Module:
        """Write the final weights and BN statistics into ``model`` (built like the workers')."""
        if sharded is not None:
            Layout.from_module(model).check_compatible(sharded.layout, "the subspace")
        return MethodWeights(self.theta(sharded), self.bn_state).load_into_(model)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly fields (no tensors)."""
        skip = ("alpha", "bn_state", "weights")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["alpha_shape"] = list(self.alpha.shape)
        return d


@dataclass(frozen=True)
class MethodWeights:
    """A method's final weights: the flat trainable parameters ``theta`` ((D,) float32; None
    for a sharded model's, written sharded by the workers: :attr:`CoeffOutcome.sharded`) and
    the BatchNorm statistics ``bn_state`` (``core.bn.bn_state`` order)."""

    theta: torch.Tensor | None
    bn_state: torch.Tensor

    def load_into_(self, model: torch.nn.Module) -> torch.nn.Module:
        """Write them into ``model`` (built like the workers')."""
        if self.theta is None:
            raise ValueError("a sharded model's weights are in its sharded files, not here")
        load_flat_(model, self.theta, Layout.from_module(model))
        load_bn_state_(model, self.bn_state)
        return model


# --------------------------------------------------------------------------- driver


def run_twa(
    sharded: ShardedSubspace,
    data: DataConfig,
    twa: TWAConfig,
    group: CoeffGroupConfig = CoeffGroupConfig(),
    *,
    run_dir: str,
    run_id: str = "twa",
    data_ref: Any = None,
) -> dict[str, TWAResult]:
    """Learn the coefficients on ``group.num_workers`` Ray Train workers, for each mode in turn.

    One ``TorchTrainer`` runs all modes (data, model and the subspace view are set up once per
    worker); a checkpoint records the finished modes, so a restart skips them.

    Args:
        sharded: the subspace in the object store (:func:`twa_ray.ray.shards.put_subspace`);
            keep the handle alive until this returns.
        data: dataset and model (the model must have the subspace's layout).
        twa: the coefficient loop: optimizer, schedule, epochs, basis placement.
        group: the worker group, batch, checkpoints and modes.
        run_dir: the run's storage (a local path or a ``pyarrow.fs`` URI, shared by the nodes);
            Ray Train writes under ``run_dir/ray_train``, the resolved config goes to
            ``run_dir/twa_<run_id>.json``, each mode's summary to ``twa_<run_id>_<mode>.json``.
        run_id: names the Ray Train run (``twa_<run_id>``); the same id and run_dir resume.
        data_ref: the dataset the driver shipped (:func:`~twa_ray.ray.group.ship_splits`), or
            None: each worker loads ``data``.

    Returns:
        ``{mode: TWAResult}``; every result carries the SWA metrics when ``group.eval_swa``.

    Raises:
        ValueError: a bad run_id or sharded (named in the message).
        ray.train.TrainingFailedError: the workers failed more than ``group.max_failures`` times.
    """
    if not isinstance(sharded, ShardedSubspace):
        raise ValueError(f"sharded is a {type(sharded).__name__}; pass shards.put_subspace(...)")
    if problem := check_run_id(run_id):
        raise ValueError(problem)
    rd = open_storage(run_dir)
    check_data_root_on_nodes(data)
    job = CoeffJob(data, twa, group, sharded, choose_placement(sharded, twa, group), data_ref)
    rd.write_json(
        f"twa_{run_id}.json",
        {
            "run_id": run_id,
            "data": asdict(data),
            "twa": twa.to_dict(),
            "options": asdict(group),
            "subspace": sharded.summary(),
            "placement": asdict(job.placement),
        },
    )
    # one worker group for all modes: data, model and the subspace view are set up once
    t0 = time.perf_counter()
    result = fit_group(
        coeff_loop_per_worker,
        {"job": job},
        name=f"twa_{run_id}",
        run_dir=rd,
        num_workers=group.num_workers,
        cpus_per_worker=group.cpus_per_worker,
        use_gpu=group.use_gpu,
        max_failures=group.max_failures,
    )  # raises TrainingFailedError once max_failures is exhausted
    return _read_results(result, group.modes, time.perf_counter() - t0, rd, run_id)


def choose_placement(
    sharded: ShardedSubspace,
    twa: TWAConfig,
    group: CoeffGroupConfig,
    device: torch.device | None = None,
) -> PlacementChoice:
    """:func:`twa_ray.core.placement.choose` for the group: 'auto' weighs B (and on a GPU the
    model's weights, gradients, theta and g) against the smallest worker's memory. On the
    driver, or on rank 0 of a running group (``device``: its own, probed there)."""
    capacity, where = group_capacity(group.use_gpu, device)
    model_bytes = (
        4 * 4 * sharded.layout.numel if group.use_gpu else 0
    )  # CPU: B is in the object store
    kind, reason = choose(
        twa.basis_placement,
        basis_bytes=sharded.nbytes,
        model_bytes=model_bytes,
        capacity_bytes=capacity,
        world=group.num_workers,
        num_shards=sharded.num_shards,
        where=where,
    )
    return PlacementChoice(kind, reason)


@dataclass
class CoeffOutcome:
    """What the driver reads back from the final checkpoint of a coefficient phase: every
    mode's :class:`TWAResult`, every method's :class:`MethodWeights` (``twa_<mode>``, and
    ``swa`` when evaluated), the subspace's summary and block labels: no B needed."""

    results: dict[str, TWAResult]
    weights: dict[str, MethodWeights]
    subspace: dict[str, Any]
    block_labels: list[str]
    checkpoint: Any = None
    """The final ``ray.train.Checkpoint``."""
    sharded: list[str] = field(default_factory=list)
    """Methods whose model the workers wrote sharded into ``checkpoint`` (strategy fsdp:
    :mod:`twa_ray.ray.fsdp_output`; their ``weights`` hold no theta)."""


def read_outcome(
    checkpoint: Any, wall: float = 0.0, *, local_dir: str | None = None
) -> CoeffOutcome:
    """The :class:`CoeffOutcome` in ``checkpoint`` (the final one of the phase); ``local_dir``:
    its files already on this machine (``checkpoint.as_directory()``), else fetched here."""
    if local_dir is None:
        with checkpoint.as_directory() as d:
            return read_outcome(checkpoint, wall, local_dir=d)
    path = os.path.join(local_dir, RESULT_FILE)
    out = torch.load(path, map_location="cpu", weights_only=True)
    weights = {k: MethodWeights(v.get("theta"), v["bn_state"]) for k, v in out["weights"].items()}
    results = {
        mode: TWAResult(
            **fields_,
            wall_time_s=wall,
            checkpoint_path=checkpoint.path,
            weights=weights[f"twa_{mode}"],
        )
        for mode, fields_ in out["modes"].items()
    }
    sharded = out.get("sharded_output", {}).get("methods", [])
    return CoeffOutcome(
        results, weights, out["subspace"], list(out["block_labels"]), checkpoint, sharded
    )


def _read_results(
    result: Any, modes: tuple[str, ...], wall: float, rd: Storage, run_id: str
) -> dict[str, TWAResult]:
    """Every mode's :class:`TWAResult` from the run's final checkpoint; summaries to ``rd``."""
    results = read_outcome(result.checkpoint, wall).results
    for mode in modes:
        rd.write_json(f"twa_{run_id}_{mode}.json", results[mode].summary())
    return results


# --------------------------------------------------------------------------- workers


@dataclass
class PhaseState:
    """What rank 0 checkpoints (``coeff.pt``, saved as a plain dict: ``weights_only`` loads)."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Finished modes: their result fields."""
    mode: str | None = None
    """The mode in flight, if any..."""
    current: CoeffState | None = None
    """...and its loop state."""
    swa: dict[str, float] | None = None
    """Metrics of the SWA point (evaluated once, before the first mode)..."""
    swa_bn: torch.Tensor | None = None
    """...and its BN statistics."""
    restarts: int = 0
    """Worker-group restarts in this checkpoint's lineage."""

    def to_dict(self) -> dict[str, Any]:
        cur = None if self.current is None else self.current.to_dict()
        return {
            "done": self.done,
            "mode": self.mode,
            "current": cur,
            "swa": self.swa,
            "swa_bn": self.swa_bn,
            "restarts": self.restarts,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseState:
        cur = d["current"]
        return cls(
            done=d["done"],
            mode=d["mode"],
            current=None if cur is None else CoeffState.from_dict(cur),
            swa=d["swa"],
            swa_bn=d.get("swa_bn"),
            restarts=int(d["restarts"]),
        )


@dataclass
class Worker:
    """One coefficient worker's setup, shared by all modes."""

    rank: int
    world: int
    device: torch.device
    splits: Any
    val_fit: Any
    """The part of val TWA-v fits on (all of it with ``hold_frac=0``)."""
    model: torch.nn.Module
    placement: Any
    extra: dict[str, Any]
    evaluation: Callable[[TWA], dict[str, Any]]
    """BN re-estimated over the train shards, then val, test and hold over their strided shards
    (:func:`~twa_ray.core.host.standard_evaluation`)."""
    carry: dict[str, Any]
    """Checkpoint files of an earlier phase that rank 0 attaches to every checkpoint."""


def coeff_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` of :func:`run_twa`: the coefficient phase alone on a
    given subspace (a ``twa-ray run`` reaches it from sampling: :mod:`twa_ray.ray.run_loop`)."""
    coeff_phase(config["job"])


def coeff_phase(
    job: CoeffJob,
    *,
    splits: Any = None,
    carry: dict[str, Any] | None = None,
    resume: bool = True,
) -> None:
    """The coefficient phase on this worker (see the module docstring): every mode not done in
    the checkpoint resumed from (``resume=False``: the checkpoint is an earlier phase's, which
    Ray may have deleted since: start fresh), then the final report (:data:`RESULT_FILE`).
    ``splits``: the dataset if loaded already; ``carry``: files of an earlier phase for every
    checkpoint."""
    TIMER.phase = "coefficients"
    with TIMER("coefficients/setup"):
        w = _setup_worker(job, splits, carry or {})
        state = _resume(w.rank, job.group.progress) if resume else PhaseState()
    clock = CheckpointClock(job.group.checkpoint_interval_s, w.device)
    for mode in job.group.modes:
        if mode in state.done:
            continue
        # no copy of B: it is on the device already
        twa = (ShardedTWA if job.fsdp_store else TWA)(w.model, w.placement, config=job.twa)
        # ---- the SWA point (alpha0, where the first mode starts), BN re-estimated, for the report
        # (the BN statistics it leaves behind do not matter: coefficient steps run in train mode)
        t0 = time.perf_counter()
        if job.group.eval_swa and state.swa is None:
            with TIMER("coefficients/swa"):
                swa = w.evaluation(twa)
            state.swa = {**_metrics(swa), "time_s": time.perf_counter() - t0}
            state.swa_bn = swa["bn_state"].cpu()
        t0 = time.perf_counter()
        out = _fit_mode(twa, mode, w, state, job, clock)
        out["mode_time_s"] = time.perf_counter() - t0
        state.done[mode], state.mode, state.current = {**out, "extra": w.extra}, None, None
        metrics = {
            k: out[k] for k in ("mode", "steps", "val_loss", "val_acc", "test_loss", "test_acc")
        }
        _report(w, metrics, state, f"checkpoint_{mode}_final")
        clock.reported()
    # ---- the result: every mode's outcome, read back by the driver from the last checkpoint
    _report(
        w,
        {f"{m}_{k}": state.done[m][k] for m in job.group.modes for k in ("val_acc", "test_acc")},
        state,
        "checkpoint_final",
        result=_final_result(w, state, job),
    )


def _final_result(w: Worker, state: PhaseState, job: CoeffJob) -> dict[str, Any] | None:
    """This rank's files of the final checkpoint: rank 0's :data:`RESULT_FILE` (every mode's
    fields, every method's weights: theta rebuilt from its alpha, a collective under a 'shard'
    placement, so every rank calls this; the subspace's summary and block labels), None on the
    other ranks; under fsdp every rank's theta shards (:func:`~.fsdp_coeff.sharded_result`)."""
    modes = job.group.modes
    alphas = {f"twa_{m}": (state.done[m]["alpha"], state.done[m]["bn_state"]) for m in modes}
    if state.swa_bn is not None:
        alphas["swa"] = (w.placement.alpha0, state.swa_bn)
    weights = {
        name: {"theta": w.placement.reconstruct(alpha.to(w.device)).cpu(), "bn_state": bn}
        for name, (alpha, bn) in alphas.items()
    }
    if job.fsdp_store:  # every method's model written sharded by the ranks, never joined
        files, out = sharded_result(w, weights, state, modes)
        return files if out is None else {**files, RESULT_FILE: out}
    if w.rank != 0:
        return None
    assert job.sharded is not None
    result = {
        "modes": {
            m: {**state.done[m], "swa": state.swa, "restarts": state.restarts} for m in modes
        },
        "weights": weights,
        "subspace": job.sharded.summary(),
        "block_labels": list(job.sharded.blocks.labels),
    }
    return {RESULT_FILE: result}


def _setup_worker(job: CoeffJob, splits: Any, carry: dict[str, Any]) -> Worker:
    """Data shards, the model and this worker's part of B (placed once on its device: every
    mode, the BN update and the evaluation reuse it; CPU: zero-copy views of the object store)."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    from twa_ray.models import build_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # ---- data: train (TWA-t, BN statistics), held-out val (TWA-v fits on val_fit; hold: the
    # saved model's choice), test (report)
    if splits is None:
        splits = load_worker_splits(job.data, job.data_ref)
    hold_frac = job.twa.hold_frac
    val_fit, hold = (
        split_held_out(splits.val, hold_frac, job.data.seed) if hold_frac else (splits.val, None)
    )
    evaluated = {
        s: ds
        for s, ds in {"val": splits.val, "test": splits.test, "hold": hold}.items()
        if ds is not None
    }
    kw = loader_options(device)
    evaluation = standard_evaluation(
        DataLoader(
            strided(splits.train, rank, world), batch_size=job.group.batch_size // world, **kw
        ),
        {
            s: DataLoader(strided(ds, rank, world), batch_size=EVAL_BATCH, **kw)
            for s, ds in evaluated.items()
        },
        bn_batches=job.group.bn_batches,
    )
    torch.manual_seed(job.data.seed)
    model = build_model(
        job.data.model, num_classes=splits.num_classes, input_shape=splits.input_shape
    )
    if job.fsdp_store:
        model, placement, extra = sharded_setup(job.fsdp_store, model, job.twa, device)
        evaluation = sharded_evaluation(job, splits, evaluated, rank, world, kw)
        return Worker(
            rank, world, device, splits, val_fit, model, placement, extra, evaluation, carry
        )
    assert job.sharded is not None
    model = model.to(device)
    Layout.from_module(model).check_compatible(job.sharded.layout, "the subspace")
    kind, reason = job.placement.kind, job.placement.reason
    placement = job.sharded.place(kind, rank=rank, world=world, device=device)
    extra = {
        "basis_placement": kind,
        "basis_placement_reason": reason,
        "basis_held_bytes": placement.held_bytes,
        "wire_bytes_per_step": placement.wire_bytes_per_step,
    }
    if device.type == "cpu":  # the packed-kernel path measured on this worker's CPU
        extra["kernel"] = kernel_info()
    if rank == 0:
        log.info(
            "twa: basis placement %s (%s); B held per worker %.1f MiB of %.1f MiB",
            kind,
            reason,
            placement.held_bytes / 2**20,
            job.sharded.nbytes / 2**20,
        )
    return Worker(rank, world, device, splits, val_fit, model, placement, extra, evaluation, carry)


def _resume(rank: int, progress: bool) -> PhaseState:
    """The state of the last reported checkpoint of this phase (finished modes, the current
    mode's loop), or a fresh one (no checkpoint, or one of an earlier phase)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return PhaseState()
    with checkpoint.as_directory() as d:
        path = os.path.join(d, STATE_FILE)
        if not os.path.exists(path):  # the sampling phase's
            return PhaseState()
        state = PhaseState.from_dict(torch.load(path, map_location="cpu", weights_only=True))
    state.restarts += 1
    if rank == 0 and progress:
        cur = state.current
        where = f"mode {state.mode} step {cur.twa['step']}" if cur else "a mode boundary"
        log.info("twa: resumed at %s (done: %s)", where, sorted(state.done))
    return state


def _fit_mode(
    twa: TWA, mode: str, w: Worker, state: PhaseState, job: CoeffJob, clock: CheckpointClock
) -> dict[str, Any]:
    """One mode's :class:`CoefficientLoop` (resuming ``state.current``), BN, evaluation, checks;
    checkpoints at its sync points when ``clock`` says so."""
    import torch.distributed as dist

    g = job.group

    def checkpoint(loop: CoefficientLoop, record: dict[str, Any]) -> None:
        if clock.due():
            state.mode, state.current = mode, loop.state()
            _report(w, record, state, f"checkpoint_{mode}_step{record['step']:07d}")
            clock.reported()

    loop = build_loop(
        twa,
        mode,
        w.splits.train,
        w.val_fit,
        batch_size=g.batch_size,
        rank=w.rank,
        world=w.world,
        seed=job.data.seed,
        loader_options=loader_options(w.device),
        hooks=LoopHooks(
            all_reduce=dist.all_reduce,
            on_step=lambda step, _loss: inject("coefficients", step, w.rank, w.world),
            on_sync=checkpoint,
            evaluate=lambda twa: _timed(w.evaluation, twa),
        ),
        sync_every=g.checkpoint_every,
        labels={"mode": mode},
        progress=w.rank == 0 and g.progress,
    )
    if state.current is not None and state.mode == mode:
        loop.load_state(state.current)
    with TIMER("coefficients/compute"):
        loop.run()
    return _mode_result(loop, mode, w, state, g.progress)


def _mode_result(
    loop: CoefficientLoop, mode: str, w: Worker, state: PhaseState, progress: bool
) -> dict[str, Any]:
    """The finished mode's result fields; checks that every worker holds the same alpha."""
    import torch.distributed as dist

    twa, bn, final = loop.twa, loop.final["bn_state"], _metrics(loop.final)
    digest = hashlib.sha256(twa.alpha.detach().cpu().numpy().tobytes()).hexdigest()
    digests: list[str | None] = [None] * w.world
    dist.all_gather_object(digests, digest)
    identical = len(set(digests)) == 1
    if w.rank == 0 and progress:
        swa_txt = f" (SWA {100 * state.swa['test_acc']:.2f}%)" if state.swa else ""
        log.info(
            "twa-%s done: val %.2f%% test %.2f%%%s; alpha identical on %d workers: %s",
            mode,
            100 * final["val_acc"],
            100 * final["test_acc"],
            swa_txt,
            w.world,
            identical,
        )
    return {
        "mode": mode,
        "alpha": twa.alpha.detach().cpu().clone(),
        "bn_state": bn.cpu(),
        **final,
        "history": loop.history,
        "steps": twa.step_count,
        "steps_per_epoch": loop.steps_per_epoch,
        "steps_per_pass": loop.steps_per_pass,
        "bytes_allreduced_per_step": twa.alpha.numel() * twa.alpha.element_size(),  # K·L·4
        "num_workers": w.world,
        "alpha_identical": identical,
        "train_time_s": loop.train_time_s,
    }


def _timed(evaluation: Callable[[TWA], dict[str, Any]], twa: TWA) -> dict[str, Any]:
    with TIMER("coefficients/evaluation"):
        return evaluation(twa)


_METRICS = ("val_loss", "val_acc", "test_loss", "test_acc", "hold_loss", "hold_acc")


def _metrics(evaluated: dict[str, Any]) -> dict[str, float]:
    """The metrics of :func:`~twa_ray.core.host.standard_evaluation`'s result (hold: if any)."""
    return {k: evaluated[k] for k in _METRICS if k in evaluated}


def _report(
    w: Worker,
    metrics: dict[str, Any],
    state: PhaseState,
    name: str,
    result: dict[str, Any] | None = None,
) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 checkpoints ``state``, every rank
    the files it carries from an earlier phase (under fsdp its shards); at the end each rank its
    ``result`` files (:data:`RESULT_FILE` on rank 0; a sharded model's files on every rank)."""
    files = dict(w.carry) or None
    if w.rank == 0:
        files = {**w.carry, STATE_FILE: state.to_dict()}
    if result is not None:
        files = {**(files or {}), **result}
    report(metrics, files, name, done={"modes": sorted(state.done), "mode": state.mode})

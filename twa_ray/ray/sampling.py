"""The sampling phase on Ray Train: data-parallel SGD that snapshots candidates into the store.

SGD (momentum, weight decay) follows the learning-rate schedule of the *full* budget of
``SamplingConfig.epochs`` epochs but stops after ``sample_epochs = ceil(sample_frac * epochs)``:
TWA then finishes training from the candidates taken on the way. Every worker receives one
frozen :class:`SamplingJob` (the configs themselves: they pickle), builds its data, model and
optimizer (``_setup``), resumes from the last checkpoint if any (``_resume``), then per epoch:

1. train (``_train_epoch``) on this worker's shard of the train split (a ``DistributedSampler`` seeded by
   ``DataConfig.seed`` and reset with ``set_epoch``: the data order is a function of
   ``(seed, epoch)``, so a resumed run replays the same steps); the val split is never trained on;
2. snapshot candidates every ``sample_interval`` epochs or steps with the public
   :func:`twa_ray.snapshot` (rank 0 writes; the final epoch is always snapshotted, so the
   last candidate is the final SGD weights, the ``sgd_sampled`` baseline);
3. evaluate val and test accuracy (``_evaluate``: each rank a strided shard, sums all-reduced);
4. (``_checkpoint``) at the last epoch, and otherwise at most once per ``checkpoint_interval_s`` seconds,
   ``ray.train.report`` on every rank; rank 0 attaches a checkpoint (model, optimizer, EMAs, epoch,
   global step, candidates written, history, resolved config).

Fault tolerance: with ``max_failures=N`` Ray restarts all workers from the last checkpoint.
Candidates written between that checkpoint and the failure are rewritten under the same names
(names derive from the global step) by an atomic replace: none is lost or duplicated.

>>> from twa_ray.config import DataConfig, SamplingConfig
>>> res = run_sampling(DataConfig(num_samples=2000), SamplingConfig(epochs=8),  # doctest: +SKIP
...                    store_uri="runs/a/candidates", run_dir="runs/a", run_id="a")
>>> res.candidates[-1], res.final_metrics["test_acc"]                          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from twa_ray.config import TRAJECTORY_FREE_FIELDS, DataConfig, SamplingConfig
from twa_ray.core.bn import all_reduce_
from twa_ray.core.checks import FiniteWatch, NonFiniteError
from twa_ray.core.ema import EMA, averages
from twa_ray.core.evaluate import EVAL_BATCH, evaluate_sharded
from twa_ray.core.optim import lr_factor
from twa_ray.errors import user_code
from twa_ray.ray.data_root import check_data_root_on_nodes
from twa_ray.ray.faults import inject
from twa_ray.ray.fsdp import (
    LocalParams,
    even_batches,
    grad_l1,
    join_shard_files,
    load_shard_state,
    shard_file,
    shard_files_world,
    shard_model,
    shard_state,
)
from twa_ray.ray.group import (
    TIMER,
    CheckpointClock,
    check_run_id,
    fit_group,
    load_worker_splits,
    report,
)
from twa_ray.ray.worker import loader_options, strided, train_autocast
from twa_ray.redact import redact
from twa_ray.storage import Storage, open_storage
from twa_ray.store.snapshots import snapshot, snapshot_due, snapshot_shards, unwrap_model
from twa_ray.store.store import CandidateStore

__all__ = [
    "SamplingJob",
    "SamplingResult",
    "SamplingState",
    "run_sampling",
    "sampling_loop_per_worker",
    "sampling_phase",
    "sampling_files",
    "phase_carry",
    "read_sampling_files",
    "prepare_run",
    "read_sampling",
]

log = logging.getLogger(__name__)

STATE_FILE = (
    "state.pt"  # model, optimizer and EMA state (torch.save; loaded with weights_only=True)
)
META_FILE = "meta.json"  # a SamplingState (readable without torch)
CONFIG_FILE = "sampling_{run_id}.json"  # resolved config of a run, next to its outputs in run_dir


@dataclass(frozen=True)
class SamplingJob:
    """What every sampling worker receives: the frozen configs themselves (they pickle)."""

    data: DataConfig
    sampling: SamplingConfig
    store_uri: str
    run_id: str
    progress: bool = True
    """Rank 0 logs one line per epoch."""
    data_ref: Any = None
    """The driver's dataset in the object store (:func:`~twa_ray.ray.group.ship_splits`), or
    None: each worker loads it."""

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-friendly values (without ``data_ref``: a process's reference)."""
        d = asdict(replace(self, data_ref=None))
        del d["data_ref"]
        return d


@dataclass
class SamplingResult:
    """What :func:`run_sampling` produced.

    Attributes:
        run_id: the run's id (stored with every candidate).
        store_uri: the candidate store.
        candidates: names of the candidates written, in step order; the last one is the final
            SGD weights (the final epoch is always snapshotted).
        history: one dict per sampled epoch: ``epoch`` (completed, 1-based), ``step`` (global
            steps done), ``lr`` (of the epoch's last step), ``train_loss``, ``val_loss``,
            ``val_acc``, ``test_loss``, ``test_acc``.
        final_metrics: the last history entry plus ``steps_per_epoch``, ``total_steps`` (of the
            full budget), ``num_train``, ``num_val``, ``num_candidates``.
        wall_time_s: seconds spent in :func:`run_sampling`.
        epoch_time_s: seconds of the epochs themselves (rank 0; the rest is start-up,
            checkpoints and teardown).
        checkpoint_path: the final Ray Train checkpoint directory (holds ``state.pt`` with the
            full model state, BN statistics included; under fsdp each rank's ``shard-<r>.pt``,
            joined on reading).
    """

    run_id: str
    store_uri: str
    candidates: list[str]
    history: list[dict[str, float]]
    final_metrics: dict[str, float]
    wall_time_s: float
    checkpoint_path: str | None
    epoch_time_s: float = 0.0
    checkpoint: Any = None  # the final ray.train.Checkpoint (local or remote storage)

    @property
    def final_candidate(self) -> str:
        """Name of the candidate holding the final SGD weights."""
        if not self.candidates:
            raise ValueError(f"sampling run {self.run_id!r} wrote no candidates")
        return self.candidates[-1]

    def read_final(self) -> torch.Tensor:
        """The final SGD weights as a flat ``(D,)`` float32 vector (trainable parameters only)."""
        return CandidateStore(self.store_uri).read(self.final_candidate)

    def read_final_state(self) -> dict[str, torch.Tensor]:
        """The final model state dict (with BN buffers) from the last Ray Train checkpoint."""
        return self._read_state()["model"]

    def read_ema(self) -> dict[float, dict[str, torch.Tensor]]:
        """``{decay: averaged parameters}`` of the run's EMAs (empty without ``sampling.ema``)."""
        state = self._read_state()
        return averages(state["ema"]) if "ema" in state else {}

    def _read_state(self) -> dict[str, Any]:
        """``state.pt`` of the last Ray Train checkpoint (a sharded model's: joined from every
        rank's shard file)."""
        if self.checkpoint is None:
            raise ValueError(f"sampling run {self.run_id!r} has no checkpoint")
        with self.checkpoint.as_directory() as d:
            if world := shard_files_world(d):
                return join_shard_files(d, world)
            return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


@dataclass
class SamplingState:
    """The loop state in every sampling checkpoint (``meta.json``, next to ``state.pt``).

    Attributes:
        epoch: epochs completed; ``step``: global steps done.
        candidates: names written so far, in step order; ``history``: one dict per epoch.
        sizes: ``steps_per_epoch``, ``total_steps``, ``num_train``, ``num_val``.
        config: the run's :class:`SamplingJob` as a dict.
        epoch_time_s: see below.
    """

    epoch: int = 0
    step: int = 0
    candidates: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    epoch_time_s: float = 0.0
    """Seconds of the epochs themselves (train, snapshots, evaluation; rank 0), summed over
    attempts: the rest of the phase's wall time is start-up, checkpoints and teardown."""

    @classmethod
    def from_dir(cls, checkpoint_dir: str) -> SamplingState:
        import json

        with open(os.path.join(checkpoint_dir, META_FILE)) as f:
            return cls(**json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- driver


def run_sampling(
    data: DataConfig,
    sampling: SamplingConfig,
    *,
    store_uri: str,
    run_dir: str,
    run_id: str,
    progress: bool = True,
    data_ref: Any = None,
) -> SamplingResult:
    """Run the sampling phase as a Ray Train ``TorchTrainer`` and return what it wrote.

    Args:
        data: dataset, model and seed.
        sampling: schedule, snapshot interval and workers.
        store_uri: candidate store (created if missing); it must hold no other run's candidates.
        run_dir: this run's storage (a local path or a ``pyarrow.fs`` URI, shared by the nodes);
            Ray Train writes under ``run_dir/ray_train``, the resolved config goes to
            ``run_dir/sampling_<run_id>.json``.
        run_id: names the run: calling again with the same ``run_id`` and ``run_dir`` resumes
            (or, when finished, just reads back) the run; ``[A-Za-z0-9._-]``.
        progress: rank 0 logs one line per epoch (Ray forwards worker logs to the driver).
        data_ref: the dataset the driver shipped (:func:`~twa_ray.ray.group.ship_splits`), or
            None: each worker loads ``data``.

    Raises:
        ValueError: bad ``run_id``, a store holding another run's candidates, or a ``run_dir``
            holding this ``run_id`` with a different config.
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    if sampling.strategy == "fsdp":
        raise ValueError(
            "strategy='fsdp' samples inside twa-ray run (run_path: one worker group, the "
            "coefficient phase on the sharded model); run_sampling takes strategy='ddp'"
        )
    t0 = time.perf_counter()
    rd = prepare_run(data, sampling, store_uri=store_uri, run_dir=run_dir, run_id=run_id)
    job = SamplingJob(
        data=data,
        sampling=sampling,
        store_uri=store_uri,
        run_id=run_id,
        progress=progress,
        data_ref=data_ref,
    )
    # raises TrainingFailedError once max_failures is exhausted
    result = fit_group(
        sampling_loop_per_worker,
        job,
        name=f"sampling_{run_id}",
        run_dir=rd,
        num_workers=sampling.num_workers,
        cpus_per_worker=sampling.cpus_per_worker,
        use_gpu=sampling.use_gpu,
        max_failures=sampling.max_failures,
        data_ref=data_ref,
    )
    return read_sampling(result.checkpoint, job, time.perf_counter() - t0)


def prepare_run(
    data: DataConfig, sampling: SamplingConfig, *, store_uri: str, run_dir: str, run_id: str
) -> Storage:
    """The checks before a run's worker group starts (see :func:`run_sampling`); the resolved
    config saved; returns the run's storage."""
    problem = check_run_id(run_id)
    if problem:
        raise ValueError(problem)
    rd = open_storage(run_dir)
    _check_store(store_uri, run_id)
    _save_or_check_config(rd, run_id, data, sampling)
    check_data_root_on_nodes(data)
    return rd


def read_sampling(
    checkpoint: Any, job: SamplingJob, wall: float, *, local_dir: str | None = None
) -> SamplingResult:
    """The :class:`SamplingResult` in a run's final checkpoint (``meta.json``, ``state.pt``),
    after checking that the store holds every candidate it recorded; ``local_dir``: the
    checkpoint's files already on this machine, else fetched here."""
    if local_dir is None:
        with checkpoint.as_directory() as d:
            return read_sampling(checkpoint, job, wall, local_dir=d)
    state = SamplingState.from_dir(local_dir)
    _check_written(job.store_uri, job.run_id, state.candidates)
    history = state.history
    final = {**(history[-1] if history else {}), **state.sizes}
    final["num_candidates"] = len(state.candidates)
    return SamplingResult(
        run_id=job.run_id,
        store_uri=job.store_uri,
        candidates=list(state.candidates),
        history=history,
        final_metrics=final,
        wall_time_s=wall,
        epoch_time_s=state.epoch_time_s,
        checkpoint_path=checkpoint.path,
        checkpoint=checkpoint,
    )


def read_sampling_files(checkpoint_dir: str, rank: int = 0) -> dict[str, Any]:
    """Rank ``rank``'s :func:`phase_carry` as saved in ``checkpoint_dir`` (a later phase carries
    them on): rank 0's :func:`sampling_files`, or under fsdp every rank its shard file and rank 0
    the loop state too."""
    import json

    files: dict[str, Any] = {}
    shard = os.path.join(checkpoint_dir, shard_file(rank))
    if os.path.exists(shard):
        files[shard_file(rank)] = torch.load(shard, map_location="cpu", weights_only=True)
    elif rank == 0:
        path = os.path.join(checkpoint_dir, STATE_FILE)
        files[STATE_FILE] = torch.load(path, map_location="cpu", weights_only=True)
    if rank == 0:
        with open(os.path.join(checkpoint_dir, META_FILE)) as f:
            files[META_FILE] = json.load(f)
    return files


def _check_store(store_uri: str, run_id: str) -> None:
    store = CandidateStore(store_uri, create=True)
    others: dict[str, str] = {}
    for name in store.names():
        owner = store.info(name).run_id
        if owner != run_id:
            others.setdefault(owner, name)
    if others:
        owner, name = next(iter(others.items()))
        raise ValueError(
            f"candidate store {store_uri!r} already holds candidates of another run ({name!r} of "
            f"run {owner!r}); a sampling run needs a store of its own: pass a new store URI, or "
            f"run_id={owner!r} to resume that run"
        )


def _save_or_check_config(
    run_dir: Storage, run_id: str, data: DataConfig, sampling: SamplingConfig
) -> None:
    """Write the resolved config next to the run; refuse to resume a run with another config."""
    resolved: dict[str, Any] = {
        "run_id": run_id,
        "data": asdict(data),
        "sampling": asdict(sampling),
    }
    name = CONFIG_FILE.format(run_id=run_id)
    if run_dir.exists(name):
        old = run_dir.read_json(name)
        diff = [
            f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}"
            for section in ("data", "sampling")
            for k, v in resolved[section].items()
            if k not in TRAJECTORY_FREE_FIELDS and old.get(section, {}).get(k) != v
        ]
        if diff:
            raise ValueError(
                f"{run_dir.uri} already holds sampling run {run_id!r} with another config "
                f"({'; '.join(diff)}); use a new run_id or run_dir, or the original config to resume"
            )
    run_dir.write_json(name, resolved)


def _check_written(store_uri: str, run_id: str, candidates: list[str]) -> None:
    """Every candidate the run recorded is in the store; warn about ones it did not record."""
    store = CandidateStore(store_uri)
    present = set(store.names())
    missing = [n for n in candidates if n not in present]
    if missing:
        raise RuntimeError(
            f"sampling run {run_id!r} recorded {len(missing)} candidate(s) that are not in store "
            f"{store_uri!r} (e.g. {missing[0]!r}): the store was changed behind the run; rerun "
            "with a new run_id and store"
        )
    recorded = set(candidates)
    stale = [n for n in sorted(present - recorded) if store.info(n).run_id == run_id]
    if stale:
        log.warning(
            "store %s holds %d candidate(s) of run %r that the finished run did not write (e.g. %s)",
            store_uri,
            len(stale),
            run_id,
            stale[0],
        )


# --------------------------------------------------------------------------- workers


@dataclass
class _Worker:
    """What one sampling worker builds in :func:`_setup` and uses every epoch."""

    job: SamplingJob
    rank: int
    world: int
    device: torch.device
    splits: Any  # the dataset (the coefficient phase reuses it)
    model: nn.Module  # as prepared by Ray Train (DDP-wrapped when world > 1)
    inner: nn.Module  # the plain model: evaluated, snapshotted, checkpointed
    opt: torch.optim.Optimizer
    sampler: Any  # DistributedSampler over the train split
    loader: Any  # this rank's train batches
    eval_loaders: tuple[Any, Any]  # this rank's strided val and test shards
    sizes: dict[str, int]  # steps_per_epoch, total_steps (of the full budget), num_train, num_val
    lr_at: Callable[[int], float]  # the learning rate of a global step
    ema: EMA | None  # rank 0 with sampling.ema: moving averages of the weights
    watch: FiniteWatch  # the first step whose loss or gradient is not finite

    @property
    def steps_per_epoch(self) -> int:
        return self.sizes["steps_per_epoch"]


def sampling_loop_per_worker(job: SamplingJob) -> None:
    """Ray Train ``train_loop_per_worker`` of :func:`run_sampling`: the sampling phase alone
    (a ``twa-ray run`` goes on in the same group: :mod:`twa_ray.ray.run_loop`)."""
    sampling_phase(job)


def sampling_phase(job: SamplingJob) -> tuple[_Worker, SamplingState]:
    """The sampling phase on this worker (see the module docstring): set up, resume from the
    last checkpoint, train the remaining epochs; returns the worker and the final state."""
    TIMER.phase = "sampling"
    with TIMER("sampling/setup"):
        w = _setup(job)
        state = _resume(w)
    clock = CheckpointClock(job.sampling.checkpoint_interval_s, w.device)
    for epoch in range(state.epoch, job.sampling.sample_epochs):
        t_epoch = time.perf_counter()
        last = epoch + 1 == job.sampling.sample_epochs
        with TIMER("sampling/compute"):
            loss_sum, lr = _train_epoch(w, state, epoch)
        _snapshot_epoch_end(w, state, epoch + 1, last=last)
        with TIMER("sampling/evaluation"):
            metrics = _evaluate(w, state, epoch + 1, loss_sum, lr)
        state.epoch = epoch + 1
        state.history.append(metrics)
        state.epoch_time_s += time.perf_counter() - t_epoch
        _log_epoch(w, state, metrics, time.perf_counter() - t_epoch)
        # the last epoch always; else at most once per checkpoint_interval_s
        if clock.due(force=last):
            _checkpoint(w, state, metrics)
            clock.reported()
    return w, state


def _setup(job: SamplingJob) -> _Worker:
    """Data, model, optimizer and schedule of this worker (identical init on every rank)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    splits = load_worker_splits(job.data, job.data_ref, stream=True)
    sampler, loader, eval_loaders = _setup_data(job, splits, rank, world, device)
    model, opt = _setup_model(job, splits)
    steps_per_epoch, split_sizes = len(loader), splits.sizes()
    sizes = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": job.sampling.epochs * steps_per_epoch,  # the schedule spans the FULL budget
        "num_train": split_sizes["train"],
        "num_val": split_sizes["val"],
    }
    return _Worker(
        job=job,
        rank=rank,
        world=world,
        device=device,
        splits=splits,
        model=model,
        inner=unwrap_model(model),
        opt=opt,
        sampler=sampler,
        loader=loader,
        eval_loaders=eval_loaders,
        sizes=sizes,
        lr_at=_lr_schedule(job.sampling, steps_per_epoch),
        ema=_make_ema(job, rank, model),
        watch=FiniteWatch(device),
    )


def _make_ema(job: SamplingJob, rank: int, model: nn.Module) -> EMA | None:
    """The EMAs with ``sampling.ema``: of the whole model on rank 0 (DDP), of each rank's own
    shards (FSDP: :class:`~twa_ray.ray.fsdp.LocalParams`)."""
    if not job.sampling.ema:
        return None
    if job.sampling.strategy == "fsdp":
        return EMA(LocalParams(model))  # type: ignore[arg-type]  # named_parameters() is all it reads
    return EMA(unwrap_model(model)) if rank == 0 else None


def _setup_data(
    job: SamplingJob, splits: Any, rank: int, world: int, device: torch.device
) -> tuple[Any, Any, tuple[Any, Any]]:
    """Train batches sharded and reshuffled per ``(seed, epoch)``; val and test only evaluated."""
    import ray.train
    from torch.utils.data import DataLoader, DistributedSampler

    from twa_ray.data.stream import StreamedTrain, StreamLoader

    s = job.sampling
    if s.batch_size < world:
        raise ValueError(
            f"batch_size={s.batch_size} is smaller than num_workers={world}: the global "
            "batch is split across workers; raise batch_size"
        )
    loader_kw = loader_options(device)
    if isinstance(splits.train, StreamedTrain):  # Ray Data: its own shards and seeded order
        shard = ray.train.get_dataset_shard(f"train_{rank}")
        sampler = loader = StreamLoader(
            splits.train, shard, rank, world, s.batch_size // world, job.data.seed
        )
    else:
        sampler = DistributedSampler(
            splits.train, num_replicas=world, rank=rank, shuffle=True, seed=job.data.seed
        )
        # drop_last: equal batches on every rank, no 1-example BatchNorm batch at the epoch end
        loader = DataLoader(
            splits.train,
            batch_size=s.batch_size // world,
            sampler=sampler,
            drop_last=True,
            persistent_workers=bool(loader_kw),
            **loader_kw,
        )
    if len(loader) == 0:
        raise ValueError(
            f"batch_size={s.batch_size} exceeds the {splits.sizes()['train']} training examples "
            "(split over the workers); lower batch_size"
        )
    val: Any
    test: Any
    val, test = (
        DataLoader(strided(ds, rank, world), batch_size=EVAL_BATCH, **loader_kw)
        for ds in (splits.val, splits.test)
    )
    if s.strategy == "fsdp":  # FSDP's forward is a collective: as many batches on every rank
        val, test = (
            even_batches(dl, len(ds), world, EVAL_BATCH)
            for dl, ds in ((val, splits.val), (test, splits.test))
        )
    return sampler, loader, (val, test)


def _setup_model(job: SamplingJob, splits: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model seeded by ``data.seed`` (DDP broadcasts rank 0's anyway) and its SGD."""
    import ray.train.torch

    from twa_ray.models import build_model

    torch.manual_seed(job.data.seed)
    model = build_model(
        job.data.model, num_classes=splits.num_classes, input_shape=splits.input_shape
    )
    s = job.sampling
    if s.strategy == "fsdp":
        model = shard_model(model, ray.train.torch.get_device())
    else:
        model = ray.train.torch.prepare_model(model)
    opt = torch.optim.SGD(
        model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
    )
    return model, opt


def _lr_schedule(s: SamplingConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """``lr(step) = lr * factor(step)`` over the full budget of ``s.epochs`` epochs ('step':
    x0.1 at 1/3 and 2/3 of the steps after warm-up)."""
    total_steps = s.epochs * steps_per_epoch
    warmup_steps = round(s.warmup_epochs * steps_per_epoch)
    step_size = max((total_steps - warmup_steps) // 3, 1)

    def lr_at(step: int) -> float:
        return s.lr * lr_factor(
            step,
            total_steps,
            schedule=s.schedule,
            warmup_steps=warmup_steps,
            step_size=step_size,
            gamma=0.1,
        )

    return lr_at


def _resume(w: _Worker) -> SamplingState:
    """The loop state: from the last reported checkpoint (after a worker failure or a driver
    restart; the model and optimizer are restored in place), else a fresh one."""
    import ray.train

    state = SamplingState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and w.job.sampling.strategy == "fsdp":
        with checkpoint.as_directory() as d:
            path = os.path.join(d, shard_file(w.rank))
            saved = torch.load(path, map_location="cpu", weights_only=True)
            state = SamplingState.from_dir(d)
        load_shard_state(saved, w.model, w.opt, w.ema)
    elif checkpoint is not None:
        with checkpoint.as_directory() as d:
            path = os.path.join(d, STATE_FILE)
            saved = torch.load(path, map_location=w.device, weights_only=True)
            state = SamplingState.from_dir(d)
        w.inner.load_state_dict(saved["model"])
        w.opt.load_state_dict(saved["optimizer"])
        if w.ema is not None:
            w.ema.load_state_dict(saved["ema"])
        if w.rank == 0 and w.job.progress:
            log.info("sampling: resumed at epoch %d, step %d", state.epoch, state.step)
    state.sizes, state.config = w.sizes, w.job.to_dict()
    return state


def _train_epoch(w: _Worker, state: SamplingState, epoch: int) -> tuple[torch.Tensor, float]:
    """One epoch of SGD on this rank's shard (snapshots at a step interval); returns this
    rank's summed loss and the learning rate of the last step."""
    s = w.job.sampling
    w.model.train()
    w.sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=w.device)
    lr = s.lr
    for x, y in w.loader:
        x, y = x.to(w.device, non_blocking=True), y.to(w.device, non_blocking=True)
        lr = w.lr_at(state.step)
        for group in w.opt.param_groups:
            group["lr"] = lr
        loss = _forward(w, x, y)
        w.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in w.inner.parameters() if p.grad is not None]
        if s.strategy == "fsdp":  # each rank holds other rows: they agree on the sum's norm
            grads = [grad_l1(grads)]
        w.watch.update_(state.step + 1, loss, grads)
        if w.device.type == "cpu":  # reading the flag costs nothing here: stop before the step
            _check_finite(w)
        w.opt.step()
        if w.ema is not None:
            w.ema.update()
        state.step += 1
        loss_sum += loss.detach()
        if s.interval_unit == "step":
            _snapshot(w, state, epoch=state.step / w.steps_per_epoch)
        inject("sampling", state.step, w.rank, w.world)
    return loss_sum, lr


def _forward(w: _Worker, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch's loss; an error raised by the model's forward is the user's (no retry)."""
    import torch.distributed as dist

    try:
        with train_autocast(w.job.sampling.precision, w.device):
            return F.cross_entropy(w.model(x), y)
    except dist.DistError:  # a collective of DDP's: a lost peer, for the retry to handle
        raise
    except Exception as e:
        if any(s in str(e) for s in _LOST_PEER):  # gloo raises a plain RuntimeError
            raise
        raise user_code(f"the model {w.job.data.model!r} (its forward pass)", e) from None


_LOST_PEER = ("gloo/transport", "NCCL", "Connection reset by peer", "Connection closed by peer")
"""What a forward's DDP collective (the buffers' broadcast) raises when a peer is lost: retried."""


def _check_finite(w: _Worker) -> None:
    """Stop at the first step whose loss or gradient was not finite (the same on every rank)."""
    step = w.watch.first()
    if step is None:
        return
    s = w.job.sampling
    raise NonFiniteError(
        f"sampling diverged at epoch {(step - 1) // w.steps_per_epoch + 1}, step {step} "
        f"(lr {w.lr_at(step - 1):.4g}): the loss or a gradient is NaN/Inf; lower the learning "
        f"rate (--lr, now {s.lr:g}) or warm it up (sampling.warmup_epochs in --config)"
    )


def _snapshot_epoch_end(w: _Worker, state: SamplingState, done: int, *, last: bool) -> None:
    """The epoch interval's snapshot after ``done`` epochs; the final epoch always (its
    weights, the SGD result at the stop, are the last candidate)."""
    s = w.job.sampling
    if s.interval_unit == "epoch":
        _snapshot(w, state, epoch=done, force=last)
    elif last and not snapshot_due(
        step=state.step, epoch=0.0, every=s.sample_interval, unit="step"
    ):
        _snapshot(w, state, epoch=done, force=True)


def _snapshot(w: _Worker, state: SamplingState, *, epoch: float, force: bool = False) -> None:
    """:func:`twa_ray.snapshot` when the interval asks (or ``force``); rank 0 records it."""
    s = w.job.sampling
    if not (
        force
        or snapshot_due(step=state.step, epoch=epoch, every=s.sample_interval, unit=s.interval_unit)
    ):
        return
    _check_finite(w)  # no diverged candidate is written (the write waits for the weights anyway)
    write = snapshot_shards if s.strategy == "fsdp" else snapshot
    with TIMER("sampling/snapshot_io"):
        name = write(
            w.model,
            w.job.store_uri,
            step=state.step,
            epoch=epoch,
            run_id=w.job.run_id,
            source="sampling",
            seed=w.job.data.seed,
        )
    if name is not None and name not in state.candidates:
        state.candidates.append(name)


def _evaluate(
    w: _Worker, state: SamplingState, done: int, loss_sum: torch.Tensor, lr: float
) -> dict[str, float]:
    """The history entry of epoch ``done``: train loss (mean over every rank's steps), val
    and test loss and accuracy (summed over the ranks' strided shards)."""
    train_loss = float(all_reduce_(loss_sum)) / (w.world * w.steps_per_epoch)
    val_loader, test_loader = w.eval_loaders
    val = evaluate_sharded(w.inner, val_loader, device=w.device)
    test = evaluate_sharded(w.inner, test_loader, device=w.device)
    _check_finite(w)
    return {
        "epoch": done,
        "step": state.step,
        "lr": lr,
        "train_loss": train_loss,
        "val_loss": val.loss,
        "val_acc": val.acc,
        "test_loss": test.loss,
        "test_acc": test.acc,
    }


def _log_epoch(w: _Worker, state: SamplingState, m: dict[str, float], seconds: float) -> None:
    # logging, not print: Ray Train 2.60 patches print() in workers and emits it twice
    if w.rank != 0 or not w.job.progress:
        return
    s = w.job.sampling
    log.info(
        "sampling epoch %d/%d (of %d), step %d: loss %.4f  lr %.4g  val %.2f%%  test %.2f%%  "
        "candidates %d  [%.1f s]",
        m["epoch"],
        s.sample_epochs,
        s.epochs,
        m["step"],
        m["train_loss"],
        m["lr"],
        100 * m["val_acc"],
        100 * m["test_acc"],
        len(state.candidates),
        seconds,
    )


def _checkpoint(w: _Worker, state: SamplingState, metrics: dict[str, float]) -> None:
    """Every rank reports (a barrier); rank 0 attaches the model, optimizer and loop state
    (FSDP: every rank its shards, :func:`~twa_ray.ray.fsdp.shard_state`)."""
    files: dict[str, Any] | None
    if w.job.sampling.strategy == "fsdp":
        shards = {shard_file(w.rank): shard_state(w.model, w.opt, w.ema)}
        files = {**shards, META_FILE: redact(state.to_dict())} if w.rank == 0 else shards
    else:
        files = sampling_files(w, state) if w.rank == 0 else None
    report(metrics, files, f"checkpoint_epoch{state.epoch:04d}", done={"epochs": state.epoch})


def phase_carry(w: _Worker, state: SamplingState) -> dict[str, Any]:
    """What the coefficient phase carries of this phase: rank 0's :func:`sampling_files`
    without the optimizer (``{}`` elsewhere); under fsdp every rank its shards of the weights and
    EMAs (:func:`~twa_ray.ray.fsdp.shard_state`, no momentum), rank 0 the loop state too:
    nothing is gathered, the driver joins the files."""
    if w.job.sampling.strategy == "fsdp":
        shards = {shard_file(w.rank): shard_state(w.model, None, w.ema)}
        return {**shards, META_FILE: redact(state.to_dict())} if w.rank == 0 else shards
    return sampling_files(w, state, optimizer=False) if w.rank == 0 else {}


def sampling_files(w: _Worker, state: SamplingState, *, optimizer: bool = True) -> dict[str, Any]:
    """The sampling phase's checkpoint files: ``state.pt`` (model, optimizer unless
    ``optimizer=False``, EMAs) and ``meta.json`` (the loop state, redacted)."""
    return {
        STATE_FILE: {
            "model": w.inner.state_dict(),
            **({"optimizer": w.opt.state_dict()} if optimizer else {}),
            **({"ema": w.ema.state_dict()} if w.ema is not None else {}),
        },
        META_FILE: redact(state.to_dict()),  # no credential in a checkpoint
    }

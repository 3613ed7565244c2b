"""One Ray Train worker group, the same for the sampling and the coefficient phase.

Driver side: :func:`check_run_id`, :func:`fit_group` (a ``TorchTrainer`` whose ``RunConfig``
points at the run's storage: a local path or any ``pyarrow.fs`` URI, see :mod:`twa_ray.storage`;
it restarts the workers only for what a restart can fix) and :func:`ship_splits` (the
driver's dataset in the object store; before it, :mod:`twa_ray.ray.data_root` checks
``--data-root`` on every node). Worker side:
:func:`load_worker_splits` (the shipped dataset or its own, after checking the data root on this
node), :func:`report` (every rank reports, a barrier; rank 0 attaches the checkpoint files),
:class:`CheckpointClock` (when the next report is due), :data:`TIMER` (rank 0's seconds per
phase of the loop) and :func:`checkpoint_phase` (which phase the checkpoint a worker resumes
from holds: its ``phase.json``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from twa_ray import redact
from twa_ray.config import DataConfig
from twa_ray.errors import RUNTIME, TwaError, describe, user_code
from twa_ray.importpath import is_import_path
from twa_ray.ray.data_root import missing_root, needs_root
from twa_ray.ray.faults import record_start
from twa_ray.storage import Storage

__all__ = [
    "check_run_id",
    "fit_group",
    "ship_splits",
    "load_worker_splits",
    "report",
    "CheckpointClock",
    "PhaseTimer",
    "TIMER",
    "PHASE_FILE",
    "checkpoint_phase",
]

log = logging.getLogger(__name__)

_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: Any) -> str | None:
    """The problem with ``run_id`` (it names Ray Train runs and store entries), or None."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        return f"run_id={run_id!r}: use 1-100 characters from [A-Za-z0-9._-]"
    return None


HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.5"


def fit_group(
    loop: Callable[[Any], None],
    config: Any,
    *,
    name: str,
    run_dir: Storage,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    max_failures: int,
    started: list[float] | None = None,
    data_ref: Any = None,
) -> Any:
    """Run ``loop(config)`` on ``num_workers`` Ray Train workers; checkpoints go to
    ``run_dir/ray_train/<name>`` (the same ``name`` and ``run_dir`` resume). ``config`` crosses
    the process boundary as it is (a frozen config dataclass pickles; no dict in between).
    Returns the ``ray.train.Result``; ``started`` (if given) gains the ``time.time()`` at which
    each attempt's ``fit()`` began (the workers' start-up is measured from there). ``data_ref``:
    the shipped dataset (:func:`ship_splits`); a streamed training split becomes the group's
    Ray Datasets (:func:`~twa_ray.data.stream.train_datasets`).

    Retries: a worker that raised leaves a :class:`~twa_ray.errors.TwaError`; one that a
    restart cannot fix (bad input, divergence, a full disk, the user's code) ends the run at
    once. A lost worker (a killed process, a lost node, an out-of-memory kill) or a runtime
    error restarts the group from its last checkpoint, at most ``max_failures`` times (Ray
    Train's ``FailureConfig`` has no hook to tell them apart: its own retries are off and each
    restart is one more ``fit()`` of the same run, which resumes from its storage).

    Raises:
        TwaError: the workers' error, or the last one once ``max_failures`` is exhausted.
    """
    failures = 0
    while True:
        trainer = _trainer(
            loop,
            config,
            name,
            run_dir,
            num_workers,
            cpus_per_worker,
            use_gpu,
            max_failures,
            data_ref,
        )
        if started is not None:
            started.append(time.time())
        try:
            result = trainer.fit()
            break
        except Exception as e:
            error, lost = _group_error(e)
            if (error is not None and not error.retry and not lost) or failures >= max_failures:
                raise _final(error, lost, failures, max_failures) from None
            failures += 1
            log.warning(
                "%s: %s; restarting the workers from the last checkpoint (%d of --max-failures %d)",
                name,
                f"a worker was lost ({lost})" if lost or error is None else error.line,
                failures,
                max_failures,
            )
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    return result


def _trainer(
    loop: Callable[[Any], None],
    config: Any,
    name: str,
    run_dir: Storage,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    max_failures: int,
    data_ref: Any = None,
) -> Any:
    """The ``TorchTrainer`` of one attempt (see :func:`fit_group`)."""
    import ray.train

    from twa_ray.ray.ray_internals import torch_trainer

    datasets = _datasets(data_ref, num_workers)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    # Ray Train's controller notices a started, reporting or finished group at its next poll
    # (every 2 s by default): 0.5 s cuts ~15 s off the default job's three groups (a value the
    # user set is kept; the driver's environment reaches the controller)
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S)
    return torch_trainer(datasets=bool(datasets))(
        # Ray's train_loop_config must be a dict: the config is bound here
        functools.partial(_worker_entry, loop, name, run_dir.uri, config),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            **run_dir.child("ray_train").train_args(),
            # worker failures are retried by fit_group (max_failures=0 here); a group that
            # cannot be placed (WorkerGroupStartupTimeoutError after
            # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, default 60 s) is retried by Ray, as many
            # times, not forever (Ray's default -1); the CLI reports it in one line
            failure_config=ray.train.FailureConfig(
                max_failures=0, controller_failure_limit=max_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        **datasets,
    )


def _datasets(data_ref: Any, num_workers: int) -> dict[str, Any]:
    """``TorchTrainer``'s ``datasets`` and ``dataset_config`` for a streamed training split
    (:mod:`twa_ray.data.stream`); none for an in-memory one."""
    from twa_ray.data.stream import StreamedTrain, dataset_config, train_datasets

    if data_ref is None:
        return {}
    import ray

    train = ray.get(data_ref).train
    if not isinstance(train, StreamedTrain):
        return {}
    return {"datasets": train_datasets(train, num_workers), "dataset_config": dataset_config()}


def _worker_entry(loop: Callable[[Any], None], name: str, where: str, config: Any) -> None:
    """A worker's ``train_loop_per_worker``: ``loop(config)``; whatever it raises leaves as a
    :class:`~twa_ray.errors.TwaError` (strings only: the driver unpickles no user class) that
    names ``where`` (the run's storage) when the error does not name its path."""
    import ray.train

    from twa_ray.ray.logs import quiet_train_logs

    TIMER.started_at = time.time()  # the loop's first line: start-up ends here
    redact.install()  # this worker's log records masked
    quiet_train_logs()
    if ray.train.get_context().get_world_rank() == 0:
        record_start(name)
    try:
        loop(config)
    except Exception as e:
        raise describe(e, where=where) from None


def _group_error(e: Exception) -> tuple[TwaError | None, str]:
    """``(the workers' error, what the lost workers' polls raised or "")`` of a failed
    ``fit()``; a ``TwaError`` raised on the driver is returned as it is, anything else Ray's
    (the controller, a worker group that could not start) is re-raised."""
    from ray.train import ControllerError, WorkerGroupError

    from twa_ray.ray.ray_internals import worker_exceptions

    if isinstance(e, TwaError):
        return e, ""
    if isinstance(e, ControllerError) or not isinstance(e, WorkerGroupError):
        raise e
    raised = worker_exceptions(e)
    ours = [x for x in raised.values() if isinstance(x, TwaError)]
    lost = "; ".join(
        f"rank {rank}: " + redact.redact(" ".join(str(x).split())[:300])
        for rank, x in sorted(raised.items())
        if not isinstance(x, TwaError)
    )
    if lost and not ours:
        return TwaError(f"a worker was lost ({lost})", RUNTIME, True, str(e)), lost
    deterministic = [x for x in ours if not x.retry]
    return (deterministic or ours)[0], lost


def _final(error: TwaError | None, lost: str, failures: int, max_failures: int) -> TwaError:
    """The error that ends the run (after ``failures`` restarts)."""
    assert error is not None
    if not lost and (not error.retry or max_failures == 0):
        return error
    return TwaError(
        f"{error.line}; the workers failed {failures + 1} time(s), more than --max-failures "
        f"{max_failures}: a killed process, a lost node or an out-of-memory kill is retried "
        "that many times; check the nodes' memory and logs, then rerun with --resume",
        RUNTIME,
        False,
        error.details,
    )


SHIP_MAX_BYTES = 256 << 20
"""The largest dataset :func:`ship_splits` puts in the object store (tensor bytes, all splits)."""


def ship_splits(splits: Any, data: DataConfig | None = None) -> Any:
    """The driver's dataset in the object store (an ``ObjectRef``) for the workers to read
    instead of building it again, or None: the workers then load it themselves. A URI dataset
    streamed by Ray Data (``--ingest stream``, or ``auto`` over the limit) ships its val and test rows and, for the training split,
    what the workers stream it from (:func:`~twa_ray.data.stream.stream_splits`).

    The rule: every split is an in-memory ``TensorDataset`` on the CPU (MNIST-1D, a user
    function that returns tensors) of at most :data:`SHIP_MAX_BYTES` in all. A dataset that
    reads or transforms its items (CIFAR, image folders, any other ``Dataset``: it may not
    pickle, or may hold open files), one on a GPU, or a larger one stays where it is; each
    worker loads its own."""
    import ray
    from torch.utils.data import TensorDataset

    from twa_ray.data.stream import stream_splits, streams

    parts = [splits.train, splits.val, splits.test]
    tensors = [t for p in parts if isinstance(p, TensorDataset) for t in p.tensors]
    in_memory = len(tensors) > 0 and all(isinstance(p, TensorDataset) for p in parts)
    large = not in_memory or sum(t.numel() * t.element_size() for t in tensors) > SHIP_MAX_BYTES
    if data is not None and streams(data, large=large):
        return ray.put(stream_splits(splits, data))
    if large or any(t.device.type != "cpu" for t in tensors):
        return None
    return ray.put(splits)


def load_worker_splits(data: DataConfig, shipped: Any = None, *, stream: bool = False) -> Any:
    """The dataset on a worker, after checking the data root on this node: the driver's copy
    when it shipped one (``shipped``: :func:`ship_splits`'s reference; the same tensors, bit
    for bit), else loaded here. A streamed training split (:mod:`twa_ray.data.stream`) is kept
    with ``stream=True`` (the sampling phase), else the dataset is loaded here."""
    from twa_ray.data import load_data
    from twa_ray.data.stream import StreamedTrain

    if needs_root(data):
        problem = missing_root(str(data.data_root))
        if problem:
            raise FileNotFoundError(problem)
    if shipped is not None:
        import ray

        splits = ray.get(shipped)
        if stream or not isinstance(splits.train, StreamedTrain):
            return splits
    try:
        return load_data(data)
    except Exception as e:
        if not is_import_path(data.dataset):
            raise
        raise user_code(f"the data function {data.dataset!r}", e) from None


def report(
    metrics: dict[str, Any], files: Mapping[str, Any] | None, name: str, *, done: Any = None
) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 passes ``files`` (file name ->
    object: ``*.json`` written as JSON, ``bytes`` as they are, anything else with
    ``torch.save``; a name may hold a folder) as the checkpoint,
    with its ``phase.json`` (:data:`TIMER`'s phase, ``done``, the seconds so far). Other ranks
    may pass files too (a sharded model's: Ray merges every rank's into one checkpoint)."""
    import ray.train

    with TIMER(f"{TIMER.phase}/checkpoint_io"), tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if files is not None:
            phase = {
                "phase": TIMER.phase,
                "done": done,
                "wall_s": dict(TIMER.seconds),
                "started_at": TIMER.started_at,
            }
            if ray.train.get_context().get_world_rank() == 0:
                files = {**files, PHASE_FILE: phase}
            for fname, obj in files.items():
                path = os.path.join(tmp, fname)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if fname.endswith(".json"):
                    with open(path, "w") as f:
                        json.dump(obj, f)
                elif isinstance(obj, bytes):  # a file's contents as they are
                    with open(path, "wb") as f:
                        f.write(obj)
                else:
                    torch.save(obj, path)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


class CheckpointClock:
    """When a worker loop's next Ray Train checkpoint is due: at most one per ``interval_s``
    seconds, plus the forced ones (a phase's end); ``interval_s = 0``: at every chance.

    Why: Ray Train 2.60 drains each worker's one-slot result queue once per health check
    (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s), so a report within 2 s of the previous one
    blocks the loop until then: a checkpoint per 0.2 s epoch made sampling 10x slower. Every
    rank must make the same call (``report`` is a barrier), so rank 0's clock decides and is
    broadcast (one 1-element collective per chance, none when forced or ``interval_s = 0``).
    """

    def __init__(self, interval_s: float, device: torch.device) -> None:
        self.interval_s = float(interval_s)
        self.device = device
        self.last = time.monotonic()

    def due(self, *, force: bool = False) -> bool:
        """True when the caller should report now (the same answer on every rank)."""
        if force or self.interval_s <= 0:
            return True
        import torch.distributed as dist

        flag = torch.tensor(
            [float(time.monotonic() - self.last >= self.interval_s)], device=self.device
        )
        if dist.is_initialized():
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def reported(self) -> None:
        """Restart the interval (call after each report)."""
        self.last = time.monotonic()


PHASE_FILE = "phase.json"
"""In every checkpoint of a worker loop: ``{"phase": "sampling" | "coefficients", "done": {...},
"wall_s": {...}, "started_at": t}``: the phase it holds, what is done, rank 0's seconds per phase
so far (all attempts) and when this attempt's loop started (``time.time()``)."""


def checkpoint_phase() -> dict[str, Any] | None:
    """``phase.json`` of the checkpoint this worker resumes from (None: a fresh start, or a
    checkpoint without one)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path = os.path.join(d, PHASE_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            phase: dict[str, Any] = json.load(f)
    return phase


class PhaseTimer:
    """Wall seconds per phase of a worker loop, exclusive: ``with TIMER("sampling/compute")``
    around an epoch and ``with TIMER("sampling/snapshot_io")`` around a snapshot inside it count
    the snapshot once, under its own name. Rank 0's seconds go into every checkpoint
    (``phase.json``) and are summed over the attempts (:meth:`resume`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started_at = 0.0  # time.time() at the loop's first line (this attempt)
        self.phase = "sampling"  # the phase in flight ("sampling", "coefficients")
        self._stack: list[list[Any]] = []  # [name, start, seconds of nested phases]

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        frame: list[Any] = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + total - frame[2]
            if self._stack:
                self._stack[-1][2] += total

    def resume(self, saved: Mapping[str, float]) -> None:
        """Add the seconds of the attempts before this one (from a checkpoint's ``phase.json``)."""
        for name, s in saved.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + float(s)


TIMER = PhaseTimer()
"""This worker process's timer (one Ray Train worker per process, one attempt per process)."""

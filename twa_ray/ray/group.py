"""One Ray Train worker group, the same for the sampling and the coefficient phase.

Driver side: :func:`check_run_id`, :func:`fit_group` (a ``TorchTrainer`` whose ``RunConfig``
points at the run's storage: a local path or any ``pyarrow.fs`` URI, see :mod:`twa_ray.storage`)
and :func:`check_data_root_on_nodes` (every node that can host a worker checks ``--data-root``
before training). Worker side: :func:`load_worker_splits` (the dataset, after checking the data
root on this node), :func:`report` (every rank reports, a barrier; rank 0 attaches the
checkpoint files) and :class:`CheckpointClock` (when the next report is due).
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from twa_ray import redact
from twa_ray.config import DataConfig
from twa_ray.storage import Storage, alive_nodes

__all__ = [
    "check_run_id",
    "fit_group",
    "check_data_root_on_nodes",
    "load_worker_splits",
    "report",
    "CheckpointClock",
]

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
) -> Any:
    """Run ``loop(config)`` on ``num_workers`` Ray Train workers; checkpoints go to
    ``run_dir/ray_train/<name>`` (the same ``name`` and ``run_dir`` resume). ``config`` crosses
    the process boundary as it is (a frozen config dataclass pickles; no dict in between).
    Returns the ``ray.train.Result``; raises ``TrainingFailedError`` once ``max_failures`` is
    exhausted."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    # Ray Train's controller notices a started, reporting or finished group at its next poll
    # (every 2 s by default): 0.5 s cuts ~15 s off the default job's three groups (a value the
    # user set is kept; the driver's environment reaches the controller)
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S)
    trainer = TorchTrainer(
        functools.partial(_on_worker, loop, config),  # Ray's train_loop_config must be a dict
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            **run_dir.child("ray_train").train_args(),
            # a group that cannot be placed (WorkerGroupStartupTimeoutError after
            # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, default 60 s) is retried max_failures
            # times, not forever (Ray's default -1); the CLI reports it in one line
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=max_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    return result


def _on_worker(loop: Callable[[Any], None], config: Any) -> None:
    """A Train worker: its log records masked (:func:`twa_ray.redact.install`), then the loop."""
    redact.install()
    loop(config)


def _missing_root(root: str) -> str | None:
    """On this node: the problem with ``root``, or None."""
    if os.path.isdir(root):
        return None
    return f"--data-root {root!r} does not exist on node {socket.gethostname()} ({_node_ip()})"


def _node_ip() -> str:
    import ray

    try:
        return str(ray.util.get_node_ip_address())
    except Exception:  # outside Ray
        return "no Ray"


def _needs_root(data: DataConfig) -> bool:
    # MNIST-1D is generated; its root is only a cache folder that it creates
    return bool(data.data_root) and data.dataset != "mnist1d"


def check_data_root_on_nodes(data: DataConfig) -> None:
    """Before training: every alive node that can host a worker (it has CPUs) checks
    ``data.data_root``; raises one ``FileNotFoundError`` naming the nodes and the path."""
    if not _needs_root(data):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0)(_missing_root)
    refs = [
        check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(data.data_root)
        for n in alive_nodes()
        if n.get("Resources", {}).get("CPU", 0) > 0
    ]
    problems = [p for p in ray.get(refs) if p]
    if problems:
        raise FileNotFoundError(
            "; ".join(problems) + "; put the dataset at that path on every node (or on shared "
            "storage mounted at the same path), or pass another --data-root"
        )


def load_worker_splits(data: DataConfig) -> Any:
    """The dataset on a worker, after checking the data root on this node."""
    from twa_ray.data import load_dataset

    if _needs_root(data):
        problem = _missing_root(str(data.data_root))
        if problem:
            raise FileNotFoundError(problem)
    return load_dataset(
        data.dataset,
        root=data.data_root,
        val_frac=data.val_frac,
        seed=data.seed,
        num_samples=data.num_samples,
    )


def report(metrics: dict[str, Any], files: Mapping[str, Any] | None, name: str) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 passes ``files`` (file name ->
    object: ``*.json`` written as JSON, anything else with ``torch.save``) as the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if files is not None:
            for fname, obj in files.items():
                path = os.path.join(tmp, fname)
                if fname.endswith(".json"):
                    with open(path, "w") as f:
                        json.dump(obj, f)
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

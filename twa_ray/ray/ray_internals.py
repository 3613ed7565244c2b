"""Every reliance on Ray behaviour that Ray 2.60 does not expose publicly, in one place.

No other module imports a private Ray name. Each workaround is a function of ours, and
``tests/ray/test_ray_internals.py`` fails loudly when a Ray upgrade changes what it relies on:

- :func:`filter_driver_logs`: Ray prints its processes' log lines on the driver through
  ``ray._private.worker.print_to_stdstream``; there is no public filter.
- :func:`train_report_loggers`: Ray Train 2.60 logs every report from a logger named by the
  file ``ray/train/v2/_internal/execution/context.py``.
- :func:`stop_train_sigint_handler`: ``TorchTrainer.fit()`` installs a SIGINT handler
  (``DataParallelTrainer._register_sigint_handler``) that aborts the worker group and returns,
  so the next phase of a command would start; twa-ray stops the whole command instead.
- :func:`worker_exceptions`: a ``WorkerGroupError`` holds each failed rank's exception wrapped
  in Ray's private ``UserExceptionWithTraceback`` (the original in ``_base_exc``).
- :func:`train_report_loggers` also names the logger of Ray Train's worker-side "Error in
  training function" traceback (``ray/train/v2/_internal/util.py``): twa-ray writes the full
  traceback to its log file and prints one line.
- :func:`keep_signal_handlers`: ``ray.init`` replaces the driver's SIGTERM handler (Python's
  ``sys.exit``, then the core worker's C++ handler that aborts with a stack dump).
- :func:`torch_trainer`: ``TorchTrainer`` starts its helper actors through the callbacks of
  ``DataParallelTrainer._create_default_callbacks``; there is no public switch for them. Its
  ``TorchConfig`` makes the controller import torch (``ray.train.torch.config`` does, at the
  top); ours runs the same worker functions of that module, referenced from the workers only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "filter_driver_logs",
    "train_report_loggers",
    "stop_train_sigint_handler",
    "keep_signal_handlers",
    "torch_trainer",
    "trial_error_loggers",
    "trial_exception",
    "worker_exceptions",
    "worker_error_logger",
]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def filter_driver_logs(drop: Callable[[dict[str, Any], str], bool]) -> None:
    """Drop the log lines that Ray forwards from its processes to the driver for which
    ``drop(record, line)`` is true (``record``: Ray's dict with ``actor_name``, ``is_err``, ...).
    Wraps the printer that ``ray.init`` installs, so it must run before it; idempotent."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_twa_ray", False):
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if not drop(data, line)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    filtered._twa_ray = True  # type: ignore[attr-defined]
    filtered.__wrapped__ = original  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


def train_report_loggers() -> list[str]:
    """The names of Ray Train's loggers that log every report and checkpoint at INFO."""
    import ray.train.v2._internal.execution.context as context  # its logger is named by __file__

    return ["ray.train", context.__file__]


def worker_error_logger() -> str:
    """The name of the logger with which a Ray Train worker logs the traceback of an error
    raised by the training function (before it reaches the driver)."""
    import ray.train.v2._internal.util as util

    return util.logger.name


def trial_error_loggers() -> tuple[str, ...]:
    """The names of the loggers with which Ray Tune, in the driver, logs the traceback of an
    error a trial raised (its controller, before the trial is retried or marked errored) and
    the list of trials that did not complete (``tune.run``'s end)."""
    import importlib

    return tuple(
        importlib.import_module(m).logger.name
        for m in ("ray.tune.execution.tune_controller", "ray.tune.tune")
    )


def trial_exception(e: BaseException | None) -> BaseException | None:
    """The exception a Tune trial raised, from ``Result.error`` (a ``RayTaskError`` whose public
    ``cause`` is the trainable's exception; also reached through ``__cause__``)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException) or cause is e:
            return e
        e = cause
    return e


def worker_exceptions(e: BaseException) -> dict[int, BaseException]:
    """The exception each failed rank raised, from a ``ray.train.WorkerGroupError`` (public:
    ``worker_failures``, rank -> Ray's wrapper of the user's exception)."""
    failures = getattr(e, "worker_failures", None) or {}
    return {rank: getattr(x, "_base_exc", x) for rank, x in failures.items()}


def stop_train_sigint_handler() -> None:
    """Keep ``TorchTrainer.fit()`` from installing its own SIGINT handler in this process, so
    that a Ctrl-C reaches the command's handler (which stops the whole command). Ray Tune's
    handler is switched off by its documented ``TUNE_DISABLE_SIGINT_HANDLER``."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    DataParallelTrainer._register_sigint_handler = lambda self, controller: None  # type: ignore[method-assign]


@contextlib.contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """Around ``ray.init``: the SIGINT and SIGTERM handlers of this process survive it.

    ``ray.init`` sets a SIGTERM handler of its own (``sys.exit``; a local head's kills Ray's
    processes first), and the core worker it starts installs a C handler that aborts the process
    with a stack dump; re-setting ours through ``signal.signal`` puts Python's handler back. A
    signal that reached Ray's handler meanwhile (seen through the wakeup fd) is sent again, to
    ours. Only the main thread handles signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in _SIGNALS}
    r, w = os.pipe()
    for fd in (r, w):
        os.set_blocking(fd, False)
    old_fd = signal.set_wakeup_fd(w)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        replaced = [s for s in _SIGNALS if signal.getsignal(s) is not before[s]]
        for s in replaced:
            signal.signal(s, before[s])
        try:
            arrived = os.read(r, 4096)
        except BlockingIOError:
            arrived = b""
        os.close(r)
        os.close(w)
        for s in replaced:
            if s in arrived:
                signal.raise_signal(s)


def _set_master(addr: str, port: int) -> None:
    """On a worker: where rank 0 listens (``init_method="env://"``)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


def _set_torch_env() -> None:
    """On a worker: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ... (torchrun's variables)."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _init_process_group(**kwargs: Any) -> None:
    """On a worker: ``torch.distributed.init_process_group``, as Ray Train's backend calls it."""
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown_torch(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


def _torch_config(backend_cls: type) -> Any:
    """Ray Train's ``TorchConfig`` (env:// init, gloo or nccl) for a controller without torch:
    the controller unpickles its backend config, and ``TorchConfig``'s module imports torch
    (~1.5 s of CPU per fit: the controller's 2.8 s against 1.3 s); this one runs
    :class:`backend_cls` there and Ray's worker functions on the workers."""
    from ray.train.backend import BackendConfig
    from ray.train.v2._internal.util import TrainingFramework

    class TorchConfigWithoutTorch(BackendConfig):
        def __init__(self, backend: str | None = None, timeout_s: int = 1800) -> None:
            self.backend, self.init_method, self.timeout_s = backend, "env", timeout_s

        @property
        def backend_cls(self) -> type:
            return backend_cls

        @property
        def train_func_context(self) -> Any:  # read on the driver, run on the workers
            from ray.train.torch.config import TorchConfigContextManager

            return TorchConfigContextManager

        @property
        def framework(self) -> Any:
            return TrainingFramework.TORCH

        def to_dict(self) -> dict[str, Any]:
            return {k: getattr(self, k) for k in ("backend", "init_method", "timeout_s")}

    return TorchConfigWithoutTorch()


def _torch_backend() -> type:
    """Ray Train's ``_TorchBackend`` (2.60) for gloo and nccl, in the controller's terms: rank 0's
    address, torchrun's variables, the process group; at shutdown, Ray's ``_shutdown_torch``."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.train._internal.utils import get_address_and_port
    from ray.train.backend import Backend
    from ray.train.constants import (
        DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    )

    class TorchBackendWithoutTorch(Backend):
        share_cuda_visible_devices = True

        def on_start(self, worker_group: Any, config: Any) -> None:
            if config.backend not in ("gloo", "nccl"):
                raise ValueError(f"torch backend {config.backend!r}: twa-ray runs gloo or nccl")
            addr, port = worker_group.execute_single(0, get_address_and_port)
            worker_group.execute(_set_master, addr=addr, port=port)
            worker_group.execute(_set_torch_env)
            world = len(worker_group)
            kwargs = dict(backend=config.backend, world_size=world, init_method="env://")
            ray.get(
                [
                    worker_group.execute_single_async(
                        i, _init_process_group, world_rank=i, timeout_s=config.timeout_s, **kwargs
                    )
                    for i in range(world)
                ]
            )

        def on_shutdown(self, worker_group: Any, config: Any) -> None:
            done = worker_group.execute_async(_shutdown_torch, len(worker_group) > 1)
            timeout = int(
                os.environ.get(
                    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                )
            )
            try:
                ray.get(done, timeout=timeout)
            except GetTimeoutError:  # as Ray's: a warning, and the group goes anyway
                logging.getLogger(__name__).warning(
                    "Torch process group shutdown timed out after %s seconds", timeout
                )

    return TorchBackendWithoutTorch


def torch_trainer(*, datasets: bool) -> type:
    """Ray Train's ``TorchTrainer`` less what a fit of twa-ray's does not use. Each helper actor
    is a process of its own that imports Ray Train (or Ray Data) while the workers start
    (1.2-1.9 s of CPU; without the first two, a 2-worker fit on 2 cores takes 9.5 s instead of
    12.3 s, ``bench/fit_overhead.py``):

    - with no ``datasets``: the ``DatasetManager`` (``DatasetsCallback``), which would hand out
      the shards of the trainer's Ray Datasets;
    - on a Ray that this process started (``ray.init`` without an address): the
      ``PlacementGroupCleaner`` (``PlacementGroupCleanerCallback``), which removes a worker
      group's placement group when its controller dies without doing so. That Ray, and every
      placement group in it, ends with this process; a cluster's fits keep the cleaner;
    - on such a Ray too: the ``AutoscalingCoordinator`` that the fixed scaling policy sends the
      group's resources to, for a cluster autoscaler to provision; a local Ray has none;
    - torch in the controller (``torch_config``: :func:`_torch_config`), on every Ray."""
    import ray._private.worker as ray_worker
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    drop: tuple[type, ...] = () if datasets else (DatasetsCallback,)
    node = ray_worker._global_node
    local = node is not None and node.is_head()
    if local:
        drop += (PlacementGroupCleanerCallback,)
    backend = _torch_backend()

    class NoAutoscalerPolicy(FixedScalingPolicy):
        """The fixed policy without resource requests (no autoscaler to read them)."""

        def _send_resource_request(self) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    class LeanTorchTrainer(TorchTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("torch_config", _torch_config(backend))
            super().__init__(*args, **kwargs)

        def _create_default_callbacks(self) -> list[Any]:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

        def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
            policy = controller_init_kwargs.get("scaling_policy")
            if local and type(policy) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = NoAutoscalerPolicy(
                    scaling_config=policy.scaling_config
                )
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return LeanTorchTrainer

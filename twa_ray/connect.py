"""Connecting to Ray within a bounded time, with one line naming what did not answer.

``ray.init`` waits without end for a head that does not answer: an ``--address`` (or
``RAY_ADDRESS``) where nothing listens, or, without one, the head recorded in Ray's
``ray_current_cluster`` file by a ``ray start --head`` that has since died (it prints
``Failed to connect to GCS`` every few seconds). Before calling it, the head's port is tried
for :func:`twa_ray.storage.connect_timeout` seconds (``--connect-timeout``):

- a given address that does not answer is refused (``ValueError``: the address and the fix);
- a stale local record is passed over: a fresh local Ray starts, with one warning line that
  says how to clear the record;
- a new local node that Ray gives up on (its raylet not registered in 30 s) is one line.

Whether Ray is local (no ``--address`` and no ``RAY_ADDRESS``: a Ray this command starts, that
cannot grow and that nothing preempts) is decided here, once: :func:`connect_ray` returns it.
"""

from __future__ import annotations

import logging
import os
import socket

from twa_ray.storage import connect_timeout

__all__ = ["connect_ray", "local_ray_defaults"]

log = logging.getLogger("twa_ray")


def answers(address: str, timeout_s: float) -> bool:
    """Something accepts a TCP connection at ``address`` (``[scheme://]host:port``) within
    ``timeout_s``; True when the address names no port (nothing to try)."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return True
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def recorded_head() -> tuple[str, str | None]:
    """Ray's record of the last ``ray start --head`` on this machine (under ``RAY_TMPDIR``):
    the file and the address in it (None when there is no record)."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            return path, f.read().strip() or None
    except OSError:
        return path, None


def connect_ray(address: str | None = None, *, dashboard: bool = True) -> bool:
    """``ray.init`` on ``address`` / ``RAY_ADDRESS`` / the recorded local head, or a new local
    Ray; a head that does not answer within the connect timeout is refused or passed over.
    Returns whether the Ray is local.

    ``dashboard=False``: a Ray started here runs without its dashboard (Ray's documented
    ``include_dashboard``: about 2 s less start-up and one process less on the CPUs for the
    whole run); a command that needs its State API (Tune's early stopping) keeps it. A cluster
    joined here keeps whatever it runs.

    Before Ray starts, Ray Train's own SIGINT handler is kept out (it would stop only the
    current phase, and the next would start: the whole command stops instead); a local Ray gets
    :func:`local_ray_defaults` (no preemption watcher: one more actor, and its ``core_worker.cc``
    error line; idle workers kept between streamed epochs).

    Raises:
        ValueError: ``--address`` / ``RAY_ADDRESS`` names a head that does not answer.
    """
    import ray

    from twa_ray.ray.ray_internals import stop_train_sigint_handler

    given, flag = (
        (address, "--address") if address else (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    )
    local = not given
    stop_train_sigint_handler()
    if local:
        local_ray_defaults()
    if ray.is_initialized():
        return local
    limit = connect_timeout()
    if given and given not in ("auto", "local"):
        if not answers(given, limit):
            raise ValueError(
                f"{flag} {given}: no Ray head answered there within {limit:g} s; check the address "
                "(`ray start --head` prints it) and that the cluster is up, or drop --address and "
                "RAY_ADDRESS to start a local Ray (--connect-timeout sets the wait)"
            )
    elif not given:
        address = _fresh_if_stale(limit)
    _init(address, dashboard)
    return local


IDLE_WORKER_MS = 60_000
"""How long a local Ray keeps an idle task worker process (Ray's default: 1 s above one per CPU).
A streamed epoch's Ray Data read tasks then run in the processes the last epoch started: 0.15 s
an epoch against 1.6 s with fresh processes (``bench/stream_epochs.py``: parquet, 2 ranks)."""


def local_ray_defaults() -> None:
    """The environment of a Ray this command starts (its processes inherit it; set values are
    kept): no Ray Train preemption watcher (nothing preempts a local Ray), and idle task
    workers kept :data:`IDLE_WORKER_MS` (``RAY_idle_worker_killing_time_threshold_ms``)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", str(IDLE_WORKER_MS))


def _fresh_if_stale(limit: float) -> str | None:
    """``'local'`` (a fresh local Ray) when the recorded local head does not answer, else None."""
    record, head = recorded_head()
    if head and not answers(head, limit):
        log.warning(
            "the local Ray recorded in %s (%s) does not answer (its `ray start --head` has "
            "stopped); starting a fresh local Ray instead (`ray stop` or deleting that file "
            "clears the record)",
            record,
            head,
        )
        return "local"
    return None


def _init(address: str | None, dashboard: bool) -> None:
    import ray

    from twa_ray.ray.ray_internals import keep_signal_handlers

    try:
        with keep_signal_handlers():  # twa-ray's SIGTERM handling (like Ctrl-C) survives ray.init
            ray.init(
                address=address,
                log_to_driver=True,
                configure_logging=False,
                include_dashboard=None if dashboard else False,
            )
    except Exception as e:  # Ray's own bound on a new local node (30 s), as a bare Exception
        if "timed out during startup" not in str(e):
            raise
        raise ValueError(
            "the local Ray did not start within Ray's 30 s (its raylet did not register: is this "
            "machine overloaded?); rerun when it is less busy, or start Ray once with "
            "`ray start --head` and pass --address"
        ) from None

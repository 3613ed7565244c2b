"""Quieter worker logs: Ray Train logs every report and checkpoint at INFO; twa_ray logs one
line per epoch instead."""

from __future__ import annotations

import logging

__all__ = ["quiet_train_logs"]


def quiet_train_logs() -> None:
    """Raise Ray Train's per-report loggers to WARNING in this worker process."""
    import ray.train.v2._internal.execution.context as context  # its logger is named by __file__

    for name in ("ray.train", context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("twa_ray").setLevel(logging.INFO)

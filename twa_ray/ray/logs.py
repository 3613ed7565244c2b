"""Quieter worker logs: Ray Train logs every report and checkpoint at INFO; twa_ray logs one
line per epoch instead."""

from __future__ import annotations

import logging

from twa_ray.ray.ray_internals import train_report_loggers

__all__ = ["quiet_train_logs"]


def quiet_train_logs() -> None:
    """Raise Ray Train's per-report loggers to WARNING in this worker process."""
    for name in train_report_loggers():
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("twa_ray").setLevel(logging.INFO)

"""Quieter worker logs: Ray Train logs every report and checkpoint at INFO; twa_ray logs one
line per epoch instead. A failure's traceback goes to twa-ray's log file, not to the console."""

from __future__ import annotations

import logging

from twa_ray.ray.ray_internals import (
    train_report_loggers,
    trial_error_loggers,
    worker_error_logger,
)

__all__ = ["quiet_train_logs", "quiet_trial_errors"]


def quiet_train_logs() -> None:
    """Raise Ray Train's per-report loggers to WARNING in this worker process, and keep the
    traceback of a failure off the console (the driver writes it to its log file)."""
    for name in train_report_loggers():
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(worker_error_logger()).setLevel(logging.CRITICAL)
    logging.getLogger("twa_ray").setLevel(logging.INFO)


def quiet_trial_errors() -> None:
    """Keep Ray Tune's traceback of a failed trial off the driver's console: the sweep ends in
    one ``twa-ray: error:`` line whose log file holds the trial's traceback (``-v`` shows it)."""
    for name in trial_error_loggers():
        logging.getLogger(name).setLevel(logging.CRITICAL)

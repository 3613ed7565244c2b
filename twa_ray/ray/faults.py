"""Fault injection for the fault-tolerance tests: one environment hook, read here only.

The training loops call :func:`inject` after every step. It does nothing unless the environment
variable ``TWA_RAY_FAULTS`` names a JSON file, which a test writes:

    [{"phase": "sampling", "kind": "raise", "step": 8, "marker": "/tmp/t/raised"},
     {"phase": "coefficients", "kind": "kill", "step": 11, "marker": "/tmp/t/killed"}]

- ``raise``: the last rank raises once (an exception in the training loop);
- ``kill``: rank 0, the rank that writes candidates and checkpoints, SIGKILLs its own process
  once (a real process death, as from the OOM killer or a lost node: no exception, no cleanup).

With the variable set, rank 0 of every worker group start appends the group's name to
``<plan>.starts`` (:func:`record_start`): the tests count the starts (a retry is one more).

Each fault fires once: its ``marker`` file is created exclusively (it records the kind, step,
rank and pid), so the restarted attempt passes. Ray's worker processes inherit the variable from
the environment of the process that started Ray (tests set it before ``ray.init``).
"""

from __future__ import annotations

import json
import os
import signal

__all__ = ["FAULTS_ENV", "inject", "record_start"]

FAULTS_ENV = "TWA_RAY_FAULTS"
PHASES = ("sampling", "coefficients")


def record_start(name: str) -> None:
    """Append ``name`` to ``<plan>.starts`` (a worker group started; tests only)."""
    path = os.environ.get(FAULTS_ENV)
    if path:
        with open(path + ".starts", "a") as f:
            f.write(name + "\n")


def inject(phase: str, step: int, rank: int, world: int) -> None:
    """Fire the faults planned for ``phase`` right after ``step`` on this rank (tests only)."""
    path = os.environ.get(FAULTS_ENV)
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        faults = json.load(f)
    for fault in faults:
        if fault["phase"] not in PHASES or fault["kind"] not in ("raise", "kill"):
            raise ValueError(
                f"{path}: fault {fault}: phase must be one of {PHASES}, kind 'raise' or 'kill'"
            )
        victim = 0 if fault["kind"] == "kill" else world - 1
        if fault["phase"] != phase or fault["step"] != step or rank != victim:
            continue
        try:
            with open(fault["marker"], "x") as m:
                m.write(f"{fault['kind']} {phase} {step} (rank {rank}, pid {os.getpid()})\n")
        except FileExistsError:
            continue
        if fault["kind"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected worker failure in {phase} at step {step} (rank {rank})")

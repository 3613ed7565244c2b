"""Failures end in one clear line, wherever they are raised (issue 30 items 1-4).

Each case runs the real command (``twa-ray run --smoke-test`` in a subprocess, with its own local
Ray) and asserts the exit code, exactly one ``twa-ray: error:`` line on stderr and no
``Traceback``, the named cause, the number of worker-group starts (counted by
:func:`twa_ray.ray.faults.record_start`: a deterministic error is not retried) and that the
outputs are unchanged or resumable.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ("run", "--smoke-test", "--workers", "2", "--cpus-per-worker", "1")


def _env(tmp: Path, *paths: Path) -> dict[str, str]:
    """The command's environment: this checkout (and ``paths``) importable, a fault plan with no
    fault (its ``.starts`` file counts the worker-group starts), a throwaway local Ray."""
    plan = tmp / "faults.json"
    plan.write_text("[]")
    pythonpath = os.pathsep.join(map(str, (ROOT, *paths)))
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "TWA_RAY_FAULTS": str(plan),
        "RAY_AUTH_MODE": "disabled",  # no token notice on stderr
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",  # a loaded 2-CPU machine
    }


def _starts(tmp: Path, phase: str = "sampling_") -> int:
    starts = tmp / "faults.json.starts"
    lines = starts.read_text().splitlines() if starts.exists() else []
    return sum(line.startswith(phase) for line in lines)


def _twa_ray(*argv: str, env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run ``twa-ray argv``; (exit code, stderr)."""
    r = subprocess.run(
        [sys.executable, "-m", "twa_ray.cli", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r.returncode, r.stderr


def _one_error_line(err: str) -> str:
    """The single ``twa-ray: error:`` line of ``err`` (nothing of Ray's, no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("twa-ray: error: "), err
    return lines[0]


def _log_of(line: str) -> str:
    """The log file the line names (it holds the full traceback)."""
    path = line.rsplit("(traceback: ", 1)[1].rstrip(")")
    text = Path(path).read_text()
    assert "Traceback (most recent call last)" in text, text
    return path


# --------------------------------------------------------------------------- divergence


@pytest.mark.ray
@pytest.mark.slow
def test_divergence_stops_at_the_step_without_a_retry(tmp_path):
    """``--lr 1e4``: the first non-finite step stops the run at once, on every rank: exit 2,
    the epoch, step, learning rate and the fix; one worker-group start although
    ``--max-failures 2`` allows two restarts; no diverged candidate in the store."""
    out = tmp_path / "out"
    code, err = _twa_ray(
        *SMOKE, "--lr", "1e4", "--max-failures", "2", "--out", str(out), env=_env(tmp_path)
    )
    line = _one_error_line(err)
    assert code == 2, err
    assert "sampling diverged at epoch 1, step " in line and "(lr 1e+04)" in line, line
    assert "lower the learning rate (--lr, now 10000)" in line, line
    assert _starts(tmp_path) == 1
    assert _log_of(line) == str(out / "logs" / "twa-ray-error.log")
    assert os.listdir(out / "candidates") == []  # stopped before any snapshot, none half-written


# --------------------------------------------------------------------------- the user's code

_USER_CODE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(40, num_classes)

    def forward(self, x):
        raise RuntimeError("deliberate failure in forward")


def model(num_classes, input_shape):
    return Net(num_classes)


def data(root=None, **kw):
    raise RuntimeError("deliberate failure loading the data")
"""


@pytest.fixture
def user_module(tmp_path) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "failing_user_code.py").write_text(textwrap.dedent(_USER_CODE))
    return folder


@pytest.mark.ray
@pytest.mark.slow
def test_a_model_whose_forward_raises_is_named_and_not_retried(tmp_path, user_module):
    """The user's model raises in its forward pass inside the Ray Train workers: one line naming
    the model, the error and the fix, exit 2 (a retry raises it again: one start with
    ``--max-failures 2``), the traceback in the log file."""
    out = tmp_path / "out"
    argv = (*SMOKE, "--model", "failing_user_code:model", "--max-failures", "2", "--out", str(out))
    code, err = _twa_ray(*argv, env=_env(tmp_path, user_module))
    line = _one_error_line(err)
    assert code == 2, err
    assert (
        "the model 'failing_user_code:model' (its forward pass) raised RuntimeError: deliberate "
        "failure in forward; fix it" in line
    ), line
    assert _starts(tmp_path) == 1
    assert "in forward" in Path(_log_of(line)).read_text()


def test_a_data_function_that_raises_is_one_line(tmp_path, user_module):
    """The user's data function raises (on the driver, before Ray starts: no worker group):
    one line with its error, exit 1 (a runtime error of the user's), the traceback in a log
    file, --out left as it was."""
    out = tmp_path / "out"
    argv = (*SMOKE, "--dataset", "failing_user_code:data", "--out", str(out))
    code, err = _twa_ray(*argv, env=_env(tmp_path, user_module), timeout=300)
    line = _one_error_line(err)
    assert code == 1, err
    assert "RuntimeError: deliberate failure loading the data" in line, line
    assert "failing_user_code.py" in Path(_log_of(line)).read_text()
    assert _starts(tmp_path) == 0 and not out.exists()


def test_a_loss_that_is_not_a_scalar_is_named(tmp_path):
    """Through the Ray Train loop API (``twa_ray.train.learn``; the CLI's loss is fixed): an
    unreduced loss is one ``ValueError`` naming its shape and the fix, before autograd fails."""
    from twa_ray.core.layout import Layout, flatten
    from twa_ray.store.store import CandidateStore
    from twa_ray.train import learn

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    layout = Layout.from_module(model)
    store = CandidateStore(tmp_path / "store", create=True)
    for step in range(3):
        params = {n: p + 0.1 * step for n, p in model.named_parameters()}
        store.write(flatten(params, layout), layout, step=step)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match=r"shape \(8,\), not a scalar: make loss_fn"):
        learn(
            model,
            str(tmp_path / "store"),
            batches,
            loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"),
        )


# --------------------------------------------------------------------------- disk and permissions


def _namespace_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: a tmpfs in a private mount namespace"
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    try:
        from harness import can_unshare
    finally:
        sys.path.pop(0)
    return can_unshare()


@pytest.mark.ray
@pytest.mark.slow
def test_disk_full_then_permission_denied_then_resume(tmp_path):
    """--out on a 256 KiB tmpfs (in a private mount namespace): the first candidate does not
    fit; one line naming the full disk and the fix, exit 2, no retry (one start with
    ``--max-failures 2``). The tmpfs grows, the candidate folder is made read-only and the
    command rerun with ``--resume`` without the right to override file modes: one line naming
    the denied permission, exit 2, no retry. With the mode back, ``--resume`` finishes the run:
    nothing written before was lost."""
    reason = _namespace_reason()
    if reason:
        pytest.skip(reason)
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    cli = shlex.join([sys.executable, "-m", "twa_ray.cli", *SMOKE, "--out", str(out)])
    no_dac = "setpriv --inh-caps=-dac_override,-dac_read_search --bounding-set=-dac_override,-dac_read_search"
    step = "echo $? > {log}/rc{n}"
    script = " ; ".join(
        [
            f"mount -t tmpfs -o size=256k tmpfs {out}",
            f"{cli} --max-failures 2 2> {logs}/err1 ; {step.format(log=logs, n=1)}",
            f"mount -o remount,size=64m {out}",
            f"cp {tmp_path}/faults.json.starts {logs}/starts1 2>/dev/null",
            f"chmod 0555 {out}/candidates",
            f"{no_dac} {cli} --resume --max-failures 2 2> {logs}/err2 ; {step.format(log=logs, n=2)}",
            f"chmod 0755 {out}/candidates",
            f"{cli} --resume 2> {logs}/err3 ; {step.format(log=logs, n=3)}",
            f"ls {out} > {logs}/ls3",
        ]
    )
    env = _env(tmp_path)
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c", script],
        env=env,
        cwd=ROOT,
        timeout=1500,
        check=True,
    )
    rc = [int((logs / f"rc{n}").read_text()) for n in (1, 2, 3)]
    err = [(logs / f"err{n}").read_text() for n in (1, 2, 3)]
    full = _one_error_line(err[0])
    assert rc[0] == 2, err[0]
    assert "out of disk space" in full and "ENOSPC" in full and "free space" in full, full
    assert (logs / "starts1").read_text().count("sampling_") == 1
    denied = _one_error_line(err[1])
    assert rc[1] == 2, err[1]
    assert "permission denied" in denied and "EACCES" in denied, denied
    assert rc[2] == 0, err[2]
    assert "metrics.json" in (logs / "ls3").read_text().split()

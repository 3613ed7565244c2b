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


def _starts(tmp: Path) -> int:
    """Worker-group starts: a run is one group (``twa_<run id>``), each retry one more."""
    starts = tmp / "faults.json.starts"
    lines = starts.read_text().splitlines() if starts.exists() else []
    assert all(line.startswith("twa_") for line in lines), lines
    return len(lines)


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


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverged_sweep_trial_is_one_line_with_its_class(tmp_path):
    """A Tune trial whose TWA lr diverges: the sweep ends in one ``twa-ray: error:`` line with
    the trial's own cause and exit code (2: a configuration to change), Tune's traceback and
    its list of incomplete trials off the console, the traceback in the log file."""
    config = tmp_path / "bad.yaml"
    config.write_text(
        "data: {dataset: mnist1d, model: mlp, seed: 0}\n"
        "sampling: {epochs: 40, sample_frac: 0.5, sample_interval: 1, num_workers: 2}\n"
        "twa: {subspace: affine, epochs: 3}\n"
        "mode: v\n"
        "sweep: {num_samples: 1, scheduler: none, space: {twa.lr: {grid: [1.0e+30]}}}\n"
    )
    out = tmp_path / "sweep"
    argv = ("sweep", "--config", str(config), "--smoke-test", "--out", str(out))
    code, err = _twa_ray(*argv, env=_env(tmp_path))
    assert code == 2, err
    assert "Traceback" not in err and "Trial task failed" not in err, err
    assert "Trials did not complete" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("twa-ray: error: ")]
    assert "every trial of sweep" in line and "TWA diverged at epoch" in line, line
    assert "lower the TWA learning rate (--twa-lr)" in line, line
    assert _log_of(line) == str(out / "logs" / "twa-ray-error.log")


# --------------------------------------------------------------------------- the user's code

_USER_CODE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(40, num_classes)

    def forward(self, x):
        if self.training:  # the driver's shape check (eval mode) passes, training fails
            raise RuntimeError("deliberate failure in forward")
        return self.fc(x.flatten(1))


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
    """The user's model raises in its training forward pass, inside the Ray Train workers (the
    driver's check of its shapes runs it in eval mode): one line naming
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


@pytest.mark.slow
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
    # the MLP: its first candidate (79,370 float32, 310 KiB) does not fit the 256 KiB tmpfs
    cli = shlex.join(
        [sys.executable, "-m", "twa_ray.cli", *SMOKE, "--model", "mlp", "--out", str(out)]
    )
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
    assert f"under {out}" in full, full  # pyarrow does not name the file: the location written
    assert (logs / "starts1").read_text().count("twa_") == 1  # one group, not retried
    denied = _one_error_line(err[1])
    assert rc[1] == 2, err[1]
    assert "permission denied" in denied and "EACCES" in denied, denied
    assert f"permission denied at {out}/candidates/" in denied, denied
    assert rc[2] == 0, err[2]
    assert "metrics.json" in (logs / "ls3").read_text().split()


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    "error, kind, retry, needle",
    [
        (
            OSError(28, "No space left on device", "/o/c/x.arrow"),
            "usage",
            False,
            "out of disk space at /o/c/x.arrow (ENOSPC",
        ),
        # pyarrow: no errno attribute, the cause in its message
        (
            OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),
            "usage",
            False,
            "out of disk space (ENOSPC: Error writing",
        ),
        (
            OSError("When uploading part for key 'k': AWS Error ACCESS_DENIED during UploadPart"),
            "usage",
            False,
            "permission denied (EACCES: When uploading",
        ),
        (
            OSError(30, "Read-only file system", "/ro/x"),
            "usage",
            False,
            "read-only file system at /ro/x",
        ),
        (
            OSError(122, "Disk quota exceeded", "/q/x"),
            "usage",
            False,
            "out of disk space at /q/x (EDQUOT",
        ),
        (FileNotFoundError(2, "No such file or directory", "/a"), "usage", False, "'/a'"),
        (ValueError("bad\n  value"), "usage", False, "bad value"),
        (
            RuntimeError("connection reset by peer"),
            "runtime",
            True,
            "RuntimeError: connection reset",
        ),
        (ConnectionResetError("reset"), "runtime", True, "ConnectionResetError: reset"),
        (KeyError("w"), "runtime", False, "KeyError: 'w'"),
    ],
)
def test_describe_gives_the_class_and_one_line(error, kind, retry, needle):
    import pickle

    from twa_ray.errors import describe

    try:
        raise error
    except Exception as e:
        got = pickle.loads(pickle.dumps(describe(e)))  # crosses the Ray boundary as strings
    assert (got.kind, got.retry, got.exit_code) == (kind, retry, 2 if kind == "usage" else 1)
    assert needle in got.line and "\n" not in got.line, got.line
    assert "Traceback" in got.details


def test_a_deterministic_worker_error_is_not_retried_a_lost_worker_is():
    """fit_group's decision on a failed ``fit()`` (Ray Train's WorkerGroupError)."""
    from ray.train import ControllerError, WorkerGroupError

    from twa_ray.errors import TwaError
    from twa_ray.ray.group import _final, _group_error

    usage = TwaError("diverged", "usage", False, "tb")
    flaky = TwaError("RuntimeError: reset", "runtime", True, "tb")
    error, lost = _group_error(WorkerGroupError("s", {0: usage, 1: flaky}))
    assert (error, lost) == (usage, "")  # the deterministic one decides: no retry
    error, lost = _group_error(WorkerGroupError("s", {0: RuntimeError("ActorDiedError")}))
    assert lost and error.retry and "a worker was lost (rank 0: ActorDiedError)" in error.line
    error, lost = _group_error(WorkerGroupError("s", {0: usage, 1: RuntimeError("died")}))
    # a lost worker's collateral: retried; the retry names what its poll raised
    assert lost == "rank 1: died"
    final = _final(flaky, "", 2, 2)
    assert final.kind == "runtime" and "more than --max-failures 2" in final.line
    assert _final(flaky, "", 0, 0) is flaky
    with pytest.raises(ControllerError):
        _group_error(ControllerError(RuntimeError("controller")))


def test_the_log_goes_under_a_twa_ray_out_else_to_the_temp_folder(tmp_path):
    from twa_ray.errors import TwaError, write_log

    error = TwaError("x", "runtime", True, "Traceback (most recent call last): ...")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    path = write_log(error, foreign)
    assert path and not path.startswith(str(foreign)) and os.listdir(foreign) == []
    os.remove(path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text("{}")
    path = write_log(error, tmp_path / "out")
    assert path == str(tmp_path / "out" / "logs" / "twa-ray-error.log")
    assert Path(path).read_text().startswith("twa-ray: error: x\n")
    assert write_log(TwaError("no details"), tmp_path / "out") is None


def test_a_storage_error_without_its_path_names_the_location_written():
    from twa_ray.errors import describe

    e = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    line = describe(e, where="/runs/a/work").line
    assert line.startswith("out of disk space under /runs/a/work (ENOSPC: Error writing"), line
    e = OSError("Failed to open local file '/o/c/.x.tmp'. Detail: [errno 13] Permission denied")
    assert describe(e, where="/o/work").line.startswith("permission denied at /o/c/.x.tmp (EACCES")
    line = describe(e, where="s3://AKIA123:secret@bkt/x").line
    assert "secret" not in line, line

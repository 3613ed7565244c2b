"""A throwaway Ray head node on localhost, driven through the same CLI a user types.

    head = start_head()                       # ray start --head --block, token auth on
    result = submit_job(head, ["python", "jobs/run_twa.py", "--smoke-test"], working_dir=repo)
    stop_head(head)                           # SIGTERM to our own `ray start`, then its group

Isolation from other Ray clusters on the same machine (other test modules, other users):
every port is picked free, the node lives in its own ``--temp-dir`` (so a leftover
``ray_current_cluster`` never reaches ``/tmp/ray``), the token is a fresh file read through
``RAY_AUTH_TOKEN_PATH`` (``~/.ray/auth_token`` is never touched), and shutdown signals only the
process group this module started: never ``ray stop``, which kills every Ray process of the
user on the machine.

Token authentication (Ray 2.60): ``ray start`` turns it on only with ``RAY_AUTH_MODE=token``
(or when ``~/.ray/auth_token`` already exists), and a client (``ray job ...``) sends the token
only with ``RAY_AUTH_MODE=token`` plus a token source (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``); ``RAY_AUTH_TOKEN`` alone is not enough.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from helpers import free_ports  # noqa: F401  (the cluster harness takes it from here)
except ImportError:  # tests/ became a package
    from tests.helpers import free_ports  # noqa: F401  (the cluster harness takes it from here)

# The Ray CLI of the interpreter running the tests (the venv's), without relying on PATH.
RAY_CLI = (sys.executable, "-m", "ray.scripts.scripts")
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# Variables that would point a CLI call at another cluster or another token.
_SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")


@dataclass
class Head:
    """A running head node started by :func:`start_head`."""

    proc: subprocess.Popen  # the `ray start --head --block` process (leader of its group)
    temp_dir: Path  # --temp-dir: sessions, logs, token, head log
    dashboard_url: str  # http://127.0.0.1:<port>: dashboard + Jobs API
    gcs_port: int  # the GCS listens on <node ip>:<gcs_port>
    token: str
    env: dict[str, str]  # environment for CLI clients of this head (auth on, token path)
    log_path: Path  # stdout + stderr of `ray start`
    startup_s: float  # seconds until the Jobs API answered


@dataclass
class JobResult:
    job_id: str
    status: str  # SUCCEEDED | FAILED | STOPPED | TIMEOUT
    logs: str
    wall_s: float  # submit -> terminal status


def client_env(token_path: Path | None) -> dict[str, str]:
    """Environment for a `ray` CLI client; ``token_path=None`` gives one without a token."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    # The job's `python` is the first one on the PATH of `ray start`: the tests' interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `ray start --block` drains its node for up to 30 s on SIGTERM (Ray 2.60) before it stops
    # its processes: a throwaway test node has nothing to drain
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    if token_path is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    return env


def http_get(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def log_tail(head: Head, n: int = 60) -> str:
    try:
        lines = head.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no head log>"
    return "\n".join(lines[-n:])


def start_head(
    *,
    num_cpus: int = 2,
    object_store_mb: int = 512,
    timeout_s: float = 180.0,
    auth: bool = True,
    extra_env: Mapping[str, str] | None = None,
) -> Head:
    """Start ``ray start --head --block`` with the dashboard on 127.0.0.1 and token auth on
    (``auth=False``: off; ``extra_env``: more variables for the head and its drivers).

    (The GCS and raylet bind the machine's address: Ray maps ``--node-ip-address 127.0.0.1``
    to it anyway. The token guards them.)

    Returns once the Jobs API answers an authenticated request. Raises ``RuntimeError`` with the
    head's log tail if it exits or does not answer within ``timeout_s``.
    """
    # Short path: Ray's unix sockets live under it (limit ~107 characters).
    base = "/tmp" if os.path.isdir("/tmp") else None
    temp_dir = Path(tempfile.mkdtemp(prefix="twa-ray-", dir=base))
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = {**client_env(token_path if auth else None), **(extra_env or {})}

    (gcs, dash, client, agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr) = free_ports(9)
    cmd = [
        *RAY_CLI,
        "start",
        "--head",
        "--block",
        "--port",
        str(gcs),
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(object_store_mb << 20),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(rt_env),
        "--metrics-export-port",
        str(metrics),
        "--node-manager-port",
        str(node_mgr),
        "--object-manager-port",
        str(obj_mgr),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    log_path = temp_dir / "head.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        # Own session: the head's processes form one group that stop_head can signal.
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(
        proc=proc,
        temp_dir=temp_dir,
        dashboard_url=f"http://127.0.0.1:{dash}",
        gcs_port=gcs,
        token=token,
        env=env,
        log_path=log_path,
        startup_s=float("nan"),
    )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"`ray start --head` exited with {proc.returncode}:\n{log_tail(head)}"
                )
            try:
                code, _ = http_get(
                    f"{head.dashboard_url}/api/jobs/", token if auth else None, timeout=2.0
                )
            except OSError:
                code = 0
            if code == 200:
                break
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(
                    f"Jobs API at {head.dashboard_url} not up after {timeout_s:.0f} s:\n"
                    + log_tail(head)
                )
            time.sleep(0.5)
    except BaseException:
        stop_head(head)
        raise
    head.startup_s = time.monotonic() - t0
    return head


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_head(head: Head, *, timeout_s: float = 45.0, keep_temp: bool = False) -> None:
    """Stop the head: SIGTERM to our `ray start --block` (it drains and stops its children),
    then SIGKILL to its process group if anything is left after ``timeout_s``."""
    pgid = head.proc.pid  # start_new_session=True: the group id is the leader's pid
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.proc.poll() is not None and not _group_alive(pgid):
            break
        time.sleep(0.2)
    else:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        head.proc.wait(timeout=10)
    if not keep_temp:
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def ray_cli(
    head: Head, *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 120.0
) -> subprocess.CompletedProcess:
    """Run ``ray <args>`` as a client of ``head`` (its auth env unless ``env`` is given)."""
    return subprocess.run(
        [*RAY_CLI, *args],
        env=dict(head.env if env is None else env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def job_status(head: Head, job_id: str) -> str:
    """Status of a job via the Jobs REST API (cheaper than a `ray job status` process per poll)."""
    code, body = http_get(f"{head.dashboard_url}/api/jobs/{job_id}", head.token)
    if code != 200:
        raise RuntimeError(f"GET /api/jobs/{job_id} -> {code}: {body[:500]!r}")
    return json.loads(body)["status"]


def submit_job(
    head: Head,
    entrypoint: Sequence[str],
    *,
    working_dir: str | Path | None = None,
    runtime_env: Mapping | None = None,
    timeout_s: float = 600.0,
    poll_s: float = 0.5,
) -> JobResult:
    """``ray job submit --no-wait``, poll until a terminal status, then ``ray job logs``.

    On timeout the job is stopped and the status reads ``TIMEOUT``.
    """
    job_id = f"twa-test-{uuid.uuid4().hex[:12]}"
    args = ["job", "submit", "--address", head.dashboard_url, "--submission-id", job_id]
    if working_dir is not None:
        args += ["--working-dir", str(working_dir)]
    if runtime_env:
        args += ["--runtime-env-json", json.dumps(dict(runtime_env))]
    args += ["--no-wait", "--", *entrypoint]
    t0 = time.monotonic()
    proc = ray_cli(head, *args)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ray job submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    status = "PENDING"
    while time.monotonic() - t0 < timeout_s:
        status = job_status(head, job_id)
        if status in TERMINAL_STATUSES:
            break
        time.sleep(poll_s)
    else:
        ray_cli(head, "job", "stop", "--address", head.dashboard_url, job_id)
        status = "TIMEOUT"
    wall_s = time.monotonic() - t0
    logs = ray_cli(head, "job", "logs", "--address", head.dashboard_url, job_id)
    return JobResult(job_id=job_id, status=status, logs=logs.stdout + logs.stderr, wall_s=wall_s)

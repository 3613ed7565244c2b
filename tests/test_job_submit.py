"""End to end: `ray job submit --working-dir <repo>` against a real local head with token auth.

One head for the module (start ~5 s, stop ~4 s). The first test is the harness's sanity check
with a tiny entrypoint; the second submits the real smoke test ``jobs/run_twa.py``.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from ray_cluster import Head, http_get, ray_cli, start_head, stop_head, submit_job
except ImportError:  # tests/ became a package
    from tests.ray_cluster import Head, http_get, ray_cli, start_head, stop_head, submit_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# The upload respects the repository's .gitignore (.venv, caches, runs/); .git is not in it.
RUNTIME_ENV = {"excludes": [".git"]}

TINY_JOB = textwrap.dedent(
    """
    import argparse, json, os, sys
    import ray

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ray.init()  # RAY_ADDRESS is set by the job supervisor
    twa = None
    try:
        import twa_ray
        twa = list(twa_ray.__path__)[0]
    except ImportError as e:
        twa = repr(e)
    info = {
        "resources": ray.cluster_resources(),
        "python": sys.executable,
        "cwd": os.getcwd(),
        "twa_ray": twa,
        "uploaded": sorted(os.listdir(".")),
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        "square": ray.get(ray.remote(lambda x: x * x).remote(7)),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "info.json"), "w") as f:
        json.dump(info, f)
    print("TINY_JOB_OK")
    """
)


@pytest.fixture(scope="module")
def head():
    h = start_head(num_cpus=2)
    try:
        yield h
    finally:
        stop_head(h)


def _explain(head: Head, result) -> str:
    return f"job {result.job_id}: {result.status} after {result.wall_s:.1f} s\n{result.logs}"


def test_tiny_job_through_ray_job_submit(head, tmp_path):
    """The harness itself: auth enforced, working dir uploaded, the venv's python, a task runs."""
    # Auth is on: the Jobs API rejects a request without the token (the CLI without
    # RAY_AUTH_MODE=token fails the same way: "Unauthorized: Missing authentication token").
    assert http_get(f"{head.dashboard_url}/api/jobs/", None)[0] == 401
    assert http_get(f"{head.dashboard_url}/api/jobs/", "0" * 64)[0] == 403

    script = tmp_path / "tiny_job.py"
    script.write_text(TINY_JOB)
    out = tmp_path / "out"
    result = submit_job(
        head,
        ["python", str(script), "--out", str(out)],
        working_dir=REPO,
        runtime_env=RUNTIME_ENV,
        timeout_s=300,
    )
    assert result.status == "SUCCEEDED", _explain(head, result)
    assert "TINY_JOB_OK" in result.logs, _explain(head, result)

    info = json.loads((out / "info.json").read_text())
    assert info["resources"]["CPU"] == 2
    assert info["square"] == 49
    assert Path(info["python"]).parent == Path(sys.executable).parent
    assert info["auth_mode"] == "token"
    # The job runs in an uploaded copy of the repository, first on PYTHONPATH.
    assert Path(info["cwd"]) != REPO
    assert Path(info["twa_ray"]).parent == Path(info["cwd"]), info["twa_ray"]
    assert "twa_ray" in info["uploaded"] and "pyproject.toml" in info["uploaded"]
    assert ".venv" not in info["uploaded"] and ".git" not in info["uploaded"], info["uploaded"]

    status = ray_cli(head, "job", "status", "--address", head.dashboard_url, result.job_id)
    assert status.returncode == 0 and "succeeded" in (status.stdout + status.stderr).lower()


def test_run_twa_smoke_job(head, tmp_path):
    """The documented entrypoint, as a user submits it (fails until jobs/run_twa.py exists)."""
    out = tmp_path / "run"
    result = submit_job(
        head,
        ["python", "jobs/run_twa.py", "--smoke-test", "--out", str(out)],
        working_dir=REPO,
        runtime_env=RUNTIME_ENV,
        timeout_s=600,
    )
    assert result.status == "SUCCEEDED", _explain(head, result)
    metrics = out / "metrics.json"
    assert metrics.is_file(), f"no {metrics}:\n{result.logs}"
    assert json.loads(metrics.read_text()), "metrics.json is empty"

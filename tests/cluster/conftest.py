"""Fixtures of the multi-node tests: moto's S3 server and a head + 3 worker nodes, each worker
node in its own mount namespace (see harness.py). Where the machine refuses ``unshare`` they
skip with the reason; under ``CI=true`` that refusal fails them instead."""

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: ray_cluster
sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness

from harness import can_unshare, start_cluster, start_s3, stop_cluster  # noqa: E402


def _require_unshare() -> None:
    reason = can_unshare()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"multi-node tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """The tests' run folders (each driver's --out): visible to the head, hidden from the
    worker nodes."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    _require_unshare()
    # every folder of this session's tests (run_root among them) is hidden from the worker nodes
    # Ray Train's default report cadence (tests/conftest.py sets 0.2 s for the other tests): the
    # kill tests' windows are the 2 s a checkpointed epoch then takes
    env = {**s3.env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    c = start_cluster(3, env=env, hide=[tmp_path_factory.getbasetemp()])
    yield c
    stop_cluster(c)

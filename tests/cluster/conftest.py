"""Fixtures of the multi-node tests: moto's S3 server and a head + 3 worker nodes, each worker
node in its own mount namespace (see harness.py), started once for every module here. Where the
machine refuses ``unshare`` they skip with the reason; under ``CI=true`` that refusal fails them
instead."""

import logging
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: ray_cluster
sys.path.insert(0, str(HERE))  # harness

from harness import can_unshare, start_cluster, start_s3, stop_cluster  # noqa: E402

_running: dict[str, object] = {}  # "s3", "cluster": what this session started, until stopped


def _require_unshare() -> None:
    reason = can_unshare()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"multi-node tests cannot run in CI: {reason}")
    pytest.skip(reason)


def _stop() -> None:
    """Stop the cluster, then the S3 server (each once)."""
    if (c := _running.pop("cluster", None)) is not None:
        stop_cluster(c)
    if (server := _running.pop("s3", None)) is not None:
        server.stop()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of this folder: the idle nodes would share the CPUs with every test
    after it until the session ends."""
    if nextitem is None or nextitem.path.resolve().parent != HERE:
        _stop()


@pytest.fixture(scope="session")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    _running["s3"] = server = start_s3()
    yield server
    _stop()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """The tests' run folders (each driver's --out): visible to the head, hidden from the
    worker nodes."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def _nodes(s3, tmp_path_factory):
    _require_unshare()
    # every folder of this session's tests (run_root among them) is hidden from the worker nodes;
    # the nodes and drivers report at the tests' 0.2 s (tests/conftest.py, in this environment;
    # the node-kill runs set their own, test_multi_node.KILL_WINDOW)
    _running["cluster"] = c = start_cluster(3, env=s3.env, hide=[tmp_path_factory.getbasetemp()])
    yield c
    _stop()


@pytest.fixture(scope="module")
def cluster(_nodes):
    """The session's cluster, all 3 worker nodes alive as each module starts (a node that a
    kill test of another module killed is replaced)."""
    _nodes.revive()
    return _nodes

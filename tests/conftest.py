import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Ray 2.60 turns token authentication on by default; throwaway local clusters in tests turn it off
# unless a test opts in (the job-submit test keeps it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller collects the workers' reports once every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (2 s by default): a worker's next ``ray.train.report`` waits for the last to be collected, and a
# group that finished or started is seen at the next poll. The tests' runs poll every 0.2 s (this
# process, and the commands and Ray workers it starts, inherit it): seconds less per worker group,
# the same results. The multi-node tests' node-kill runs poll every 0.5 s
# (tests/cluster/test_multi_node.py): their kills are timed by the checkpoints it paces.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
torch.set_num_threads(2)

# ---- pytest-xdist (``-n 2 --dist loadfile``: pyproject.toml's addopts; docs/development.md) ----------------

# Folders whose conftest holds session fixtures that several of its files use: one xdist unit each,
# so they run once (the cluster's head and 3 nodes; the examples' Lightning and HF runs).
_ONE_UNIT = ("tests/cluster/", "tests/integrations/")
_RAY_TMPDIR = pytest.StashKey[str]()


def _unit(nodeid: str) -> str:
    """The xdist unit of a test: its file, or one of the ``_ONE_UNIT`` folders."""
    path = nodeid.split("::", 1)[0]
    return next((folder for folder in _ONE_UNIT if path.startswith(folder)), path)


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker's Rays keep to a temp dir of their own (``RAY_TMPDIR``, inherited by the
    commands it starts): their ``ray_current_cluster`` and ``session_latest`` are not another
    worker's. A short path: Ray's Unix sockets live under it (~107 characters at most)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is not None:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"ray-{worker}-", dir="/tmp")
        config.stash[_RAY_TMPDIR] = os.environ["RAY_TMPDIR"]


_FAILED = pytest.StashKey[bool]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_FAILED] = exitstatus != 0


def pytest_unconfigure(config: pytest.Config) -> None:
    """A worker's Ray temp dir goes, unless a test failed: its Rays' logs then stay there."""
    if (path := config.stash.get(_RAY_TMPDIR, None)) is None:
        return
    if config.stash.get(_FAILED, False):
        print(f"\nthe Ray logs of {os.environ.get('PYTEST_XDIST_WORKER')}'s tests: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the ``_ONE_UNIT`` folders as one unit each: a file's module
    fixtures (a shared smoke run, a module's Ray) and a folder's session fixtures run once."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

        def _reschedule(self, node) -> None:
            """The next unit once a worker's last test is all it has left (a worker holds its
            last test until it knows the next one; xdist's default, 2 left, had a unit wait
            behind a long end-to-end test while the other worker sat idle)."""
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, the units that take longest come first (the cluster, then files of
    end-to-end runs, then those that start a Ray, then the unit tests; the same order on every
    worker): the workers pick units in this order, and the last to finish is a short one."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return
    rank: dict[str, int] = {}
    for item in items:
        r = next(
            (i for i, m in enumerate(("cluster", "slow", "ray")) if item.get_closest_marker(m)), 3
        )
        rank[_unit(item.nodeid)] = min(rank.get(_unit(item.nodeid), 3), r)
    items.sort(key=lambda item: rank[_unit(item.nodeid)])  # stable: a file keeps its order


@pytest.fixture(scope="session")
def mnist1d_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where generated MNIST-1D arrays are kept (~10 s for the default size): pytest's cache,
    so only the first run generates them; without it (``-p no:cacheprovider``, as .ci/run runs)
    one folder for the session (the xdist workers' one: the cache is written atomically), so
    tests/data and tests/models generate them once, not twice."""
    cache = getattr(pytestconfig, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("twa_ray_mnist1d"))
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        base = base.parent  # the session's base temp; the worker's is popen-gw<N> under it
    (base / "mnist1d").mkdir(exist_ok=True)
    return base / "mnist1d"


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def _ray_session() -> str | None:
    """The session a local Ray started by this process last (Ray links
    ``<temp dir>/ray/session_latest`` to ``session_<time>_<pid of the starting process>``; the
    temp dir found as Ray finds it, without importing Ray). Sessions that other processes start
    meanwhile (another user's Ray on the same temp dir) are not this test's."""
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        name = os.readlink(os.path.join(tmp, "ray", "session_latest"))
    except OSError:
        return None
    return name if name.endswith(f"_{os.getpid()}") else None


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_ray(request):
    """A test that starts a Ray in the test process is marked ``ray``: the fast inner loop
    (README "Development": ``-m "not ray and not slow and not cluster"``) deselects it."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    before = _ray_session()
    yield
    after = _ray_session()
    if after is not None and after != before:
        pytest.fail(
            f"{request.node.nodeid} started a Ray but is not marked ray: add @pytest.mark.ray"
        )

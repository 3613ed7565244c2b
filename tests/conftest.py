import os
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


@pytest.fixture(scope="session")
def mnist1d_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where generated MNIST-1D arrays are kept (~10 s for the default size): pytest's cache,
    so only the first run generates them; without it (``-p no:cacheprovider``, as .ci/run runs)
    one folder for the session, so tests/data and tests/models generate them once, not twice."""
    cache = getattr(pytestconfig, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("twa_ray_mnist1d"))
    return tmp_path_factory.mktemp("mnist1d")


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

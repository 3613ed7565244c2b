import os

import pytest
import torch

# Ray 2.60 turns token authentication on by default; throwaway local clusters in tests turn it off
# unless a test opts in (the job-submit test keeps it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def _ray_session() -> str | None:
    """The session a local Ray started here last (Ray links ``<temp dir>/ray/session_latest`` to
    a new folder each time one starts; the temp dir as Ray picks it, without importing Ray)."""
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        return os.readlink(os.path.join(tmp, "ray", "session_latest"))
    except OSError:
        return None


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_ray(request):
    """A test that starts a Ray (in-process or in a subprocess) is marked ``ray``: the fast inner
    loop (README "Development": ``-m "not ray and not slow and not cluster"``) deselects it."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    before = _ray_session()
    yield
    if _ray_session() != before:
        pytest.fail(f"{request.node.nodeid} started a Ray but is not marked ray: add @pytest.mark.ray")

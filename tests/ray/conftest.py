"""One local Ray cluster per test module (start ~3 s, shutdown ~1.5 s), and planned faults."""

import json
import os

import pytest
from helpers import free_port

from twa_ray.ray.faults import FAULTS_ENV


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    from twa_ray.connect import local_ray_defaults

    # Ray Train reads this on the driver and passes it on: on a loaded 2-CPU machine a worker
    # group took up to ~60 s to start (the default timeout). The rest is what a local Ray that
    # twa-ray starts gets (no preemption watcher, idle workers kept between streamed epochs).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    local_ray_defaults()
    # before ray.init: the Ray workers inherit it; the file exists only while a test plans faults
    os.environ[FAULTS_ENV] = str(tmp_path_factory.mktemp("faults") / "faults.json")
    # Ray's own TorchTrainer (the examples' fits) starts a PlacementGroupCleaner that asks the
    # State API whether the fit's controller lives, at the API server it finds: with no
    # address given, that of *any* Ray running on the machine (another xdist worker's, with a
    # dashboard). Not finding the controller there, it removed the live fit's placement group
    # ("Destroying worker since its placement group was removed"). Its processes ask this
    # Ray's port instead (no dashboard: no answer, and the cleaner keeps waiting, as it does
    # alone on a machine); the test process's own environment is left as it was.
    port = free_port()
    api = "RAY_API_SERVER_ADDRESS"
    before, os.environ[api] = os.environ.get(api), f"http://127.0.0.1:{port}"
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            dashboard_port=port,
            object_store_memory=512 << 20,
        )
    finally:
        if before is None:
            os.environ.pop(api)
        else:
            os.environ[api] = before
    yield
    ray.shutdown()
    os.environ.pop(FAULTS_ENV, None)


@pytest.fixture
def plan_faults(ray_cluster):
    """``plan_faults([{"phase", "kind", "step", "marker"}, ...])`` (see twa_ray.ray.faults) for
    the runs of one test; removed afterwards."""
    path = os.environ[FAULTS_ENV]

    def plan(faults):
        with open(path + ".tmp", "w") as f:
            json.dump([{**fault, "marker": str(fault["marker"])} for fault in faults], f)
        os.replace(path + ".tmp", path)

    yield plan
    if os.path.exists(path):
        os.remove(path)

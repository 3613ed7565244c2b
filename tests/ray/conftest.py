"""One local Ray cluster per test module (start ~3 s, shutdown ~1.5 s)."""

import os

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # Ray Train reads these on the driver and passes them on. On a loaded 2-CPU machine a
    # worker group took up to ~60 s to start (the default timeout); the preemption watcher is
    # one more actor process per run that a local test does not need.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 << 20)
    yield
    ray.shutdown()

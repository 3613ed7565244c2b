"""``--dataset parquet --data-root s3://...`` on the private-disk test cluster (harness.py): no node
holds a copy of the data; the smoke job on 2 and on 3 worker nodes records the same splits."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from harness import submit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: data_files

from data_files import write_parquet  # noqa: E402

from twa_ray.data import load_dataset  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RUN = ["python", "jobs/run_twa.py", "--smoke-test", "--dataset", "parquet"]


@pytest.fixture(scope="module")
def data_uri(s3):
    """MNIST-1D as parquet in the bucket, written from here; its splits as this process reads
    them."""
    old = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        uri = s3.uri("data/mnist1d-parquet")
        write_parquet(uri, 1000, files=3)
        yield uri, load_dataset("parquet", root=uri).summary()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("workers", [2, 3])
def test_parquet_from_s3_on_worker_nodes_without_a_copy(cluster, s3, run_root, data_uri, workers):
    uri, expected = data_uri
    prefix = f"pq{workers}"
    argv = [*RUN, "--data-root", uri, "--workers", str(workers), "--storage", s3.uri(prefix)]
    res = submit(cluster, [*argv, "--out", str(run_root / prefix)], working_dir=REPO)
    assert res.status == "SUCCEEDED", f"job {res.job_id}: {res.status}\n{res.logs[-6000:]}"
    metrics = json.loads((run_root / prefix / "metrics.json").read_text())
    assert metrics["data"] == expected  # the same val rows, whatever the number of workers
    assert metrics["methods"]["twa_v"]["test_acc"] > 0.2

"""``--dataset parquet|images --data-root s3://...`` on the private-disk test cluster (harness.py):
no node holds a copy of the data; the training split streams through Ray Data (the default
``--ingest stream``); the smoke job records the same splits as the data read here, for parquet
on 3 worker nodes and for images on 2 (the same splits with 1 and 2 workers, and after a
``--resume``: tests/ray/test_data_uri_run.py, on one node)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from harness import submit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: data_files

from data_files import write_images, write_parquet  # noqa: E402

from twa_ray.data import load_dataset  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RUN = ["python", "jobs/run_twa.py", "--smoke-test"]
# images: 300 files; a val split that gives TWA-v a batch on each worker
VAL_FRAC = {"parquet": 0.1, "images": 0.25}


@pytest.fixture(scope="module")
def data_uris(s3):
    """MNIST-1D as parquet and a small image folder in the bucket, written from here; their
    splits as this process reads them."""
    old = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        pq_uri, im_uri = s3.uri("data/mnist1d-parquet"), s3.uri("data/images")
        write_parquet(pq_uri, 1000, files=3)
        write_images(im_uri, per_class=100, splits=("train",))
        yield {
            kind: (
                uri,
                VAL_FRAC[kind],
                load_dataset(kind, root=uri, val_frac=VAL_FRAC[kind]).summary(),
            )
            for kind, uri in (("parquet", pq_uri), ("images", im_uri))
        }
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize(("kind", "workers"), [("parquet", 3), ("images", 2)])
def test_data_from_s3_on_worker_nodes_without_a_copy(
    cluster, s3, run_root, data_uris, kind, workers
):
    uri, val_frac, expected = data_uris[kind]
    prefix = f"{kind}{workers}"
    argv = [*RUN, "--dataset", kind, "--ingest", "stream", "--data-root", uri]
    argv += ["--val-frac", str(val_frac)]
    argv += ["--model", "mlp"] if kind == "images" else []  # the default cnn1d is for 1-D inputs
    argv += ["--workers", str(workers), "--storage", s3.uri(prefix)]
    res = submit(cluster, [*argv, "--out", str(run_root / prefix)], working_dir=REPO)
    assert res.status == "SUCCEEDED", f"job {res.job_id}: {res.status}\n{res.logs[-6000:]}"
    metrics = json.loads((run_root / prefix / "metrics.json").read_text())
    assert metrics["data"] == expected  # the same val rows, whatever the number of workers
    chance = 1 / (10 if kind == "parquet" else 3)
    assert metrics["methods"]["twa_v"]["test_acc"] > 2 * chance

"""``twa-ray run --dataset parquet --data-root s3://...`` end to end on a local Ray (2 CPUs): the
workers read MNIST-1D as parquet from the S3 server (no local copy), with 1 and with 2 workers;
both runs, and a ``--resume`` of the second, record the same splits (sizes and ``val_digest``)
as the data read here."""

import contextlib
import io
import json

import pytest
from data_files import write_parquet
from s3_faults import moto_s3

from twa_ray.cli import main
from twa_ray.data import load_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def s3():
    """Started before ``ray_cluster`` (the tests name it first): the Ray workers inherit the S3
    server's keys from this process's environment."""
    with moto_s3() as endpoint:
        uri = f"s3://bkt/mnist1d-parquet?endpoint_override={endpoint}&scheme=http"
        write_parquet(uri, 1000, files=3)
        yield uri


def test_parquet_in_s3_same_splits_with_1_and_2_workers_and_a_resume(s3, ray_cluster, tmp_path):
    expected = load_dataset("parquet", root=s3, seed=0).summary()
    recorded = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        argv = ["run", "--smoke-test", "--dataset", "parquet", "--data-root", s3]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*argv, "--workers", workers, "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        recorded.append(metrics["data"])
        assert metrics["methods"]["twa_v"]["test_acc"] > 0.2  # 10 classes: chance is 0.1
        assert metrics["methods"]["sgd_sampled"]["val_acc"] > 0.2
    # --resume of the 2-worker run: the same splits, no candidate sampled again
    out = tmp_path / "w2"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "candidates").glob("*.arrow")}
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--workers", "2", "--out", str(out), "--resume"]) == 0
    recorded.append(json.loads((out / "metrics.json").read_text())["data"])
    after = {p.name: p.stat().st_mtime_ns for p in (out / "candidates").glob("*.arrow")}
    assert recorded == [expected] * 3 and after == before and before

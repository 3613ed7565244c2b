"""``twa-ray run --dataset parquet --data-root s3://...`` end to end on a local Ray (2 CPUs): the
workers read MNIST-1D as parquet from the S3 server (no local copy), with 1 and with 2 workers;
both runs, and a ``--resume`` of the second, record the same splits (sizes and ``val_digest``)
as the data read here; Ray Data's read tasks run without torch."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from data_files import write_hf_disk, write_images, write_parquet
from helpers import TorchWatch
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
    with TorchWatch(b"ray::MapBatches(ReadRows)") as reads:
        for workers in ("1", "2"):
            out = tmp_path / f"w{workers}"
            argv = [
                "run",
                "--smoke-test",
                "--dataset",
                "parquet",
                "--ingest",
                "stream",
                "--data-root",
                s3,
            ]
            with contextlib.redirect_stdout(io.StringIO()):
                assert main([*argv, "--workers", workers, "--out", str(out)]) == 0
            metrics = json.loads((out / "metrics.json").read_text())
            recorded.append(metrics["data"])
            assert metrics["methods"]["twa_v"]["test_acc"] > 0.2  # 10 classes: chance is 0.1
            assert metrics["methods"]["sgd_sampled"]["val_acc"] > 0.2
    # the read tasks (twa_ray.data.read_tasks) imported no torch: ~1 s of CPU each
    assert reads.seen and not any(reads.seen.values()), reads.seen
    # --resume of the 2-worker run: the same splits, no candidate sampled again
    out = tmp_path / "w2"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "candidates").glob("*.arrow")}
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--workers", "2", "--out", str(out), "--resume"]) == 0
    recorded.append(json.loads((out / "metrics.json").read_text())["data"])
    after = {p.name: p.stat().st_mtime_ns for p in (out / "candidates").glob("*.arrow")}
    assert recorded == [expected] * 3 and after == before and before


# --------------------------------------------------------------------------- the stream itself


def _streamed(root, world, ingest="stream", **kw):
    """The in-memory splits, the streamed ones, and the streamed training split's rows per rank
    (x, y numpy)."""
    from twa_ray.config import DataConfig
    from twa_ray.data.stream import stream_splits, train_datasets

    dataset = {"pq": "parquet", "im": "images", "hf": "hf_disk"}[root.name]
    splits = load_dataset(dataset, root=str(root), **kw)
    data = DataConfig(dataset=dataset, data_root=str(root), ingest=ingest, **kw)
    streamed = stream_splits(splits, data)
    shards = []
    for ds in train_datasets(streamed.train, world).values() if ingest == "stream" else ():
        rows = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        shards.append(
            (np.concatenate([b["x"] for b in rows]), np.concatenate([b["y"] for b in rows]))
        )
    return splits, streamed, shards


def _row_set(x, y):
    return sorted(zip(map(bytes, np.ascontiguousarray(x, np.float32)), y.tolist()))


@pytest.mark.parametrize(
    ("kind", "world", "kw"),
    [
        ("pq", 2, {}),
        ("pq", 3, {"num_samples": 500, "seed": 3}),
        ("im", 2, {"val_frac": 0.2}),
        ("hf", 2, {"num_samples": 300}),
    ],
    ids=["parquet-2", "parquet-3-num_samples", "images-2", "hf_disk-2-num_samples"],
)
def test_streamed_train_rows_are_the_in_memory_train_rows(ray_cluster, tmp_path, kind, world, kw):
    """The ranks' streamed rows partition the in-memory path's training rows (the same key
    rule), val and test are the driver's, and each rank gets the rows its count says."""
    root = tmp_path / kind
    writers = {"pq": lambda r: write_parquet(r, 600, files=3), "hf": write_hf_disk}
    writers.get(kind, write_images)(str(root))
    splits, streamed, shards = _streamed(root, world, **kw)
    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))]).numpy()
    y = splits.train.targets.numpy()
    got_x = np.concatenate([s[0] for s in shards])
    got_y = np.concatenate([s[1] for s in shards])
    assert _row_set(got_x, got_y) == _row_set(x, y) and len(got_y) == len(y)
    assert [len(s[1]) for s in shards] == streamed.train.rows_per_rank(world).tolist()
    assert min(len(s[1]) for s in shards) > 0
    assert (
        streamed.val is splits.val
        and streamed.summary()["val_digest"] == splits.summary()["val_digest"]
    )


def _epoch(train, epoch, batch=16):
    """Rank 1 of 2's batches of ``epoch`` (numpy), as its worker's StreamLoader yields them."""
    from twa_ray.data.stream import StreamLoader, ingest_options, train_datasets

    ds = train_datasets(train, 2)["train_1"]
    ds.context.execution_options = ingest_options()  # what the workers get: blocks in order
    loader = StreamLoader(train, ds.iterator(), 1, 2, batch, 0)
    loader.set_epoch(epoch)
    assert len(loader) == train.rows_per_rank(2).min() // batch
    return [(x.numpy(), y.numpy()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(
        np.array_equal(xa, xb) and np.array_equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


def test_an_epochs_batches_are_a_function_of_seed_epoch_and_rank(ray_cluster, tmp_path):
    """Two passes over the same epoch give the same batches (a restart replays them); another
    epoch gives another order of the same rows."""
    write_parquet(str(tmp_path / "pq"), 600, files=3)
    _, streamed, _ = _streamed(tmp_path / "pq", 2)
    a, b, c = (_epoch(streamed.train, e) for e in (1, 1, 2))
    assert _same(a, b) and len(a) == len(c) > 1 and not _same(a, c)


def test_images_decoded_in_the_worker_give_the_same_batches(ray_cluster, tmp_path):
    """--ingest stream_worker_decode: the read tasks pass the files' bytes, the worker decodes
    them: the same batches as decoding in Ray Data's tasks."""
    write_images(str(tmp_path / "im"), per_class=20)
    in_tasks = _streamed(tmp_path / "im", 2)[1].train
    in_worker = _streamed(tmp_path / "im", 2, ingest="stream_worker_decode")[1].train
    assert in_worker.worker_decode and not in_tasks.worker_decode
    a, b = _epoch(in_tasks, 0, batch=8), _epoch(in_worker, 0, batch=8)
    assert _same(a, b) and len(a) > 1 and a[0][0].dtype == np.float32

"""Datasets read from a storage URI (``--dataset parquet|images|hf_disk --data-root URI``): the
same rows from a local folder and from the S3 server, the seeded val/test rule, the refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_files import mnist1d_arrays, write_hf_disk, write_images, write_parquet
from s3_faults import moto_s3

from twa_ray.cli import main
from twa_ray.data import load_dataset
from twa_ray.data.splits import val_digest
from twa_ray.data.uri import carve

N = 1000  # MNIST-1D rows: 800 train pool, 200 test


@pytest.fixture(scope="module")
def s3():
    """The moto S3 server: a URI maker ``s3(prefix)`` for the bucket ``bkt``."""
    with moto_s3() as endpoint:
        yield lambda prefix: f"s3://bkt/{prefix}?endpoint_override={endpoint}&scheme=http"


def _rows(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def test_parquet_rows_splits_and_shapes(tmp_path):
    a = write_parquet(str(tmp_path / "pq"), N, files=3)
    s = load_dataset("parquet", root=str(tmp_path / "pq"), val_frac=0.1, seed=0)
    assert (s.num_classes, s.input_shape) == (10, (40,))
    sizes = s.sizes()
    assert sizes["test"] == 200  # the provided test folder, as given
    assert sizes["train"] + sizes["val"] == 800 and 50 <= sizes["val"] <= 110
    x_test, y_test = _rows(s.test)
    assert torch.equal(x_test, torch.from_numpy(a["x_test"]))
    assert torch.equal(y_test, torch.from_numpy(a["y_test"]))
    # train and val partition the pool: every row exactly once
    x_pool = torch.cat([_rows(s.train)[0], _rows(s.val)[0]])
    pool = {r.numpy().tobytes() for r in torch.from_numpy(a["x_train"])}
    assert len(x_pool) == 800 and {r.numpy().tobytes() for r in x_pool} == pool
    assert not set(s.train.keys) & set(s.val.keys)


def test_carving_is_per_row_and_seeded():
    keys = [f"train/part-0.parquet#{i}" for i in range(4000)]
    val = carve(keys, 0, 0.0, 0.1)
    assert 300 < val.sum() < 500
    # one row's fate does not depend on the others (workers, blocks, order)
    assert np.array_equal(carve(keys[::-1], 0, 0.0, 0.1)[::-1], val)
    assert np.array_equal(carve(keys[:100], 0, 0.0, 0.1), val[:100])
    assert not np.array_equal(carve(keys, 1, 0.0, 0.1), val)  # another seed, other rows
    test = carve(keys, 0, 0.1, 0.2)
    assert not (val & test).any()


def test_no_test_folder_carves_test_like_val(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    a = mnist1d_arrays(N)
    table = pa.table({"f": pa.array(list(a["x_train"]), pa.list_(pa.float32())), "y": a["y_train"]})
    pq.write_table(table, root / "all.parquet")
    s = load_dataset("parquet", root=str(root), feature_columns="f", label_column="y", seed=3)
    sizes = s.sizes()
    assert sum(v for v in sizes.values()) == 800 and min(sizes.values()) > 40
    assert not set(s.val.keys) & set(s.test.keys)
    again = load_dataset("parquet", root=str(root), feature_columns=["f"], label_column="y", seed=3)
    assert again.summary() == s.summary()


def test_scalar_feature_columns(tmp_path):
    root = tmp_path / "cols"
    root.mkdir()
    rng = np.random.default_rng(0)
    cols = {f"c{i}": rng.normal(size=300).astype(np.float32) for i in range(5)}
    pq.write_table(pa.table({**cols, "label": rng.integers(0, 4, 300)}), root / "t.parquet")
    s = load_dataset("parquet", root=str(root), feature_columns="c0,c2,c4")
    assert s.input_shape == (3,) and s.num_classes <= 4
    x, _ = s.train[0]
    k = int(s.train.keys[0].split("#")[1])
    assert torch.equal(x, torch.tensor([cols[c][k] for c in ("c0", "c2", "c4")]))


def test_images_and_hf_disk(tmp_path):
    write_images(str(tmp_path / "im"), per_class=10, classes=3, size=6)
    s = load_dataset("images", root=str(tmp_path / "im"), val_frac=0.2)
    assert (s.num_classes, s.input_shape, s.sizes()["test"]) == (3, (3, 6, 6), 30)
    x, y = s.train[0]
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert s.train.keys[0].startswith("train/c") and y.dtype == torch.int64

    a = write_hf_disk(str(tmp_path / "hf"), N)
    h = load_dataset("hf_disk", root=str(tmp_path / "hf"))
    assert (h.num_classes, h.input_shape, h.sizes()["test"]) == (10, (40,), 200)
    assert torch.equal(_rows(h.test)[1], torch.from_numpy(a["y_test"]))
    # one Dataset saved (not a DatasetDict): the training pool, val and test carved from it
    one = load_dataset("hf_disk", root=str(tmp_path / "hf" / "train"))
    assert sum(one.sizes().values()) == 800 and one.num_classes == 10
    assert set(one.val.keys).isdisjoint(one.test.keys)


@pytest.mark.parametrize("kind", ["parquet", "images", "hf_disk"])
def test_s3_reads_the_same_rows_as_local_disk(tmp_path, s3, kind):
    write = {"parquet": write_parquet, "images": write_images, "hf_disk": write_hf_disk}[kind]
    for uri in (str(tmp_path / kind), s3(kind)):
        write(uri)
    local = load_dataset(kind, root=str(tmp_path / kind), seed=5)
    remote = load_dataset(kind, root=s3(kind), seed=5)
    assert remote.summary() == local.summary()
    for split in ("train", "val", "test"):
        for a, b in zip(_rows(getattr(local, split)), _rows(getattr(remote, split))):
            assert torch.equal(a, b)


def test_val_digest_of_every_kind(tmp_path):
    m = load_dataset("mnist1d", num_samples=N, seed=0)
    assert (
        m.summary()["val_digest"] == load_dataset("mnist1d", num_samples=N).summary()["val_digest"]
    )
    assert (
        m.summary()["val_digest"]
        != load_dataset("mnist1d", num_samples=N, seed=1).summary()["val_digest"]
    )
    # a val without keys (a plain Dataset): the digest of its rows' contents
    rows = [m.val[i] for i in range(len(m.val))]
    assert val_digest(rows) == val_digest(m.val)  # type: ignore[arg-type]
    h = hashlib.sha256()
    for x, y in rows:
        h.update(x.numpy().tobytes() + y.numpy().tobytes())
    assert val_digest(rows) == h.hexdigest()[:16]  # type: ignore[arg-type]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows)

    assert val_digest(Stream()) == val_digest(m.val)  # no __len__: iterated
    assert val_digest(["not a pair"] * 3) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- refusals


def _missing_label(tmp: Path) -> list[str]:
    write_parquet(str(tmp / "pq"), 400, label="target")
    return ["--dataset", "parquet", "--data-root", str(tmp / "pq")]


def _mixed_sizes(tmp: Path) -> list[str]:
    write_images(str(tmp / "im"), per_class=3, size=6)
    write_images(str(tmp / "im2"), per_class=1, size=7, splits=("train",))
    big = next((tmp / "im2" / "train" / "c0").iterdir())
    big.rename(tmp / "im" / "train" / "c0" / "big.png")
    return ["--dataset", "images", "--data-root", str(tmp / "im")]


def _empty_split(tmp: Path) -> list[str]:
    write_parquet(str(tmp / "pq"), 400)
    for f in (tmp / "pq" / "test").iterdir():
        pq.write_table(pq.read_table(f).slice(0, 0), f)
    return ["--dataset", "parquet", "--data-root", str(tmp / "pq")]


BAD = [
    pytest.param(
        lambda tmp: ["--dataset", "parquet", "--data-root", str(tmp / "nowhere")],
        "is not a folder",
        id="missing-folder",
    ),
    pytest.param(
        lambda tmp: ["--dataset", "parquet", "--data-root", "nosuch://bkt/x"],
        "cannot be opened",
        id="bad-uri-scheme",
    ),
    pytest.param(
        lambda tmp: ["--dataset", "parquet", "--data-root", str(tmp)],
        "holds no .parquet files",
        id="no-parquet-files",
    ),
    pytest.param(_missing_label, "no label column 'label'", id="missing-label-column"),
    pytest.param(_mixed_sizes, "images of different sizes", id="mixed-image-sizes"),
    pytest.param(_empty_split, "the test split is empty", id="empty-split"),
]


@pytest.mark.parametrize("make,needle", BAD)
def test_bad_data_is_one_line_exit_2_before_ray_starts(tmp_path, capsys, make, needle):
    import ray

    data = tmp_path / "data"
    data.mkdir()
    argv = make(data)
    before = sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*"))
    out = tmp_path / "o"
    assert main(["run", "--smoke-test", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twa-ray: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err, err
    assert not ray.is_initialized()  # refused before Ray starts
    assert not (out / "run.json").exists()
    assert sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*")) == before


def test_s3_credentials_in_a_bad_data_root_are_masked(tmp_path, capsys, s3):
    uri = s3("nothing-here").replace("s3://", "s3://AKIDLEAK0123:LEAKsecretVALUE0123@")
    argv = ["run", "--smoke-test", "--out", str(tmp_path / "o"), "--dataset", "parquet"]
    assert main([*argv, "--data-root", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LEAKsecretVALUE0123" not in err, err


def test_average_and_import_read_parquet_from_s3(tmp_path, s3, capsys):
    """``average`` learns its coefficients on the parquet data's val split read from S3 and
    records it; ``import --model`` builds the model from the data's shape and classes."""
    from helpers import make_store

    make_store(tmp_path, num_samples=N, epochs=3)
    uri = s3("avg")
    write_parquet(uri, N)
    data = ["--dataset", "parquet", "--data-root", uri, "--model", "mlp"]
    fast = ["--twa-epochs", "1", "--mode", "v", "--no-greedy-soup"]
    out = tmp_path / "avg"
    argv = ["average", "--store", str(tmp_path / "store"), *data, *fast, "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == load_dataset("parquet", root=uri).summary()
    assert metrics["methods"]["twa_v"]["val_acc"] > 0.2
    from twa_ray.models import build_model

    (tmp_path / "pt").mkdir()
    for i in range(2):
        torch.manual_seed(i)
        model = build_model("mlp", num_classes=10, input_shape=(40,))
        torch.save(model.state_dict(), tmp_path / "pt" / f"c{i}.pt")
    imported = tmp_path / "imported"
    assert main(["import", str(tmp_path / "pt"), "--out", str(imported), *data]) == 0
    assert len(list(imported.glob("*.arrow"))) == 2


def test_ragged_list_features_are_refused(tmp_path):
    root = tmp_path / "ragged"
    root.mkdir()
    rows = [[0.0, 1.0], [2.0], [3.0, 4.0]] * 50
    pq.write_table(pa.table({"x": rows, "label": [0, 1, 2] * 50}), root / "t.parquet")
    with pytest.raises(ValueError, match="rows of 'x' differ in length; pad them"):
        load_dataset("parquet", root=str(root))

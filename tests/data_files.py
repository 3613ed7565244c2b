"""Writers of the URI datasets' files (parquet, an image folder, a ``save_to_disk`` folder) for
tests and benchmarks: on a local folder or any ``pyarrow.fs`` URI (the moto S3 server)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twa_ray.data import load_dataset
from twa_ray.storage import filesystem_from_uri


def _fs(uri: str):
    fs, base = filesystem_from_uri(uri)
    return fs, base.rstrip("/")


def mnist1d_arrays(num_samples: int = 1000) -> dict[str, np.ndarray]:
    """MNIST-1D's train pool and test split (x float32 (N, 40), y int64)."""
    splits = load_dataset("mnist1d", num_samples=num_samples, val_frac=0.0)
    out = {}
    for name in ("train", "test"):
        x, y = splits.__getattribute__(name).tensors
        out[f"x_{name}"], out[f"y_{name}"] = x.numpy(), y.numpy()
    return out


def _table(x: np.ndarray, y: np.ndarray, label: str = "label") -> pa.Table:
    return pa.table({"x": pa.array(list(x), pa.list_(pa.float32())), label: pa.array(y)})


def write_parquet(uri: str, num_samples: int = 1000, *, files: int = 2, label: str = "label"):
    """MNIST-1D as parquet: ``train/part-*.parquet`` (``files`` files) and ``test/part-0``;
    columns ``x`` (list<float32>, 40) and ``label`` (int64)."""
    fs, base = _fs(uri)
    a = mnist1d_arrays(num_samples)
    for i, idx in enumerate(np.array_split(np.arange(len(a["y_train"])), files)):
        fs.create_dir(f"{base}/train")
        pq.write_table(
            _table(a["x_train"][idx], a["y_train"][idx], label),
            f"{base}/train/part-{i}.parquet",
            filesystem=fs,
        )
    fs.create_dir(f"{base}/test")
    pq.write_table(
        _table(a["x_test"], a["y_test"], label), f"{base}/test/part-0.parquet", filesystem=fs
    )
    return a


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_images(
    uri: str, per_class: int = 12, *, classes: int = 3, size: int = 8, splits=("train", "test")
) -> None:
    """A tiny RGB ImageFolder: ``<split>/c<k>/<i>.png``, class k brighter in channel k % 3."""
    fs, base = _fs(uri)
    rng = np.random.default_rng(0)
    for split in splits:
        for k in range(classes):
            fs.create_dir(f"{base}/{split}/c{k}")
            for i in range(per_class):
                img = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
                img[..., k % 3] += 120
                with fs.open_output_stream(f"{base}/{split}/c{k}/{i:03d}.png") as f:
                    f.write(_png(img))


def write_hf_disk(uri: str, num_samples: int = 1000) -> dict[str, np.ndarray]:
    """MNIST-1D as a ``DatasetDict.save_to_disk`` folder (train, test): Arrow stream files,
    ``state.json``, ``dataset_info.json`` with a ``ClassLabel`` label, ``dataset_dict.json``."""
    fs, base = _fs(uri)
    a = mnist1d_arrays(num_samples)
    features = {
        "x": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"},
        "label": {"names": [str(i) for i in range(10)], "_type": "ClassLabel"},
    }
    for split in ("train", "test"):
        fs.create_dir(f"{base}/{split}")
        table = _table(a[f"x_{split}"], a[f"y_{split}"])
        with fs.open_output_stream(f"{base}/{split}/data-00000-of-00001.arrow") as f:
            with pa.ipc.new_stream(f, table.schema) as w:
                w.write_table(table)
        files = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split}
        for name, obj in (("state.json", files), ("dataset_info.json", {"features": features})):
            with fs.open_output_stream(f"{base}/{split}/{name}") as f:
                f.write(json.dumps(obj).encode())
    with fs.open_output_stream(f"{base}/dataset_dict.json") as f:
        f.write(json.dumps({"splits": ["train", "test"]}).encode())
    return a

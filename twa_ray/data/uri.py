"""Datasets read from a storage URI: ``--dataset parquet|images|hf_disk --data-root URI``.

``--data-root`` is a local (or NFS) folder or any ``pyarrow.fs`` URI (``s3://bucket/prefix?...``,
``gs://...`` where pyarrow has GCS), opened like ``--storage`` (:func:`twa_ray.storage.
filesystem_from_uri`: credentials from the environment or the URI, masked in every message).
Every node reads the data itself: no node needs a local copy.

- ``parquet``: ``*.parquet`` files; ``x`` is the ``--feature-columns`` (default: every column but
  the label; one list column -> a vector, several numeric columns -> their row vector, an image
  column ``{bytes, path}`` -> the decoded image), ``y`` the integer ``--label-column`` (default
  ``label``).
- ``images``: image files in ImageFolder layout (``<split>/<class>/<file>``); ``x`` is the image
  as float32 in [0, 1], (C, H, W) with C = 1 (grayscale) or 3; every image must have one size.
- ``hf_disk``: a Hugging Face ``save_to_disk`` folder (a ``DatasetDict``: ``dataset_dict.json`` +
  one folder per split, or one ``Dataset``), its Arrow files read with pyarrow (``datasets`` is
  not needed); columns as for parquet; a ``ClassLabel`` label gives the number of classes.

Splits. Folders (parquet, images) or splits (hf_disk) named ``train``, ``val`` / ``validation``
and ``test`` are used as given; without a ``train`` the whole root is the training pool. A
missing ``val`` is carved out of train by a seeded hash of each row's key (the file path
relative to the root, ``#row`` for a row in a file): a row is val when ``u(seed, key) <
val_frac``, where ``u`` is the first 8 bytes of ``blake2b(seed, key)`` as a fraction of 2^64. A
missing ``test`` is carved the same way, by ``val_frac <= u < 2 val_frac``. The rule sees one
row at a time: it is the same on every node, for every number of workers or files, and on a
``--resume``. ``num_samples`` keeps the first that many training rows in key order (smoke runs).

This module imports no torch (only :func:`load_uri_dataset` does, for its result): Ray Data's
read tasks use its readers (:mod:`twa_ray.data.read_tasks`).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from twa_ray.redact import redact

if TYPE_CHECKING:
    from twa_ray.data.splits import DataSplits

__all__ = ["URI_DATASETS", "DEFAULT_LABEL", "load_uri_dataset", "carve"]

URI_DATASETS = ("parquet", "images", "hf_disk")
"""Dataset names read from ``--data-root URI``."""
DEFAULT_LABEL = "label"
"""The default ``--label-column``."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass
class _Rows:
    """One split as read: keys, features (N, ...) and labels (N,)."""

    keys: list[str]
    x: np.ndarray
    y: np.ndarray

    def take(self, mask: np.ndarray) -> _Rows:
        return _Rows([k for k, m in zip(self.keys, mask) if m], self.x[mask], self.y[mask])


def _fail(root: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"--data-root {redact(root)!r}: {problem}; {fix}")


def key_unit(keys: Sequence[str], salt: str) -> np.ndarray:
    """``u(salt, key)`` of each key: the first 8 bytes of ``blake2b(salt, key)`` / 2^64, in [0, 1)."""
    u = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{salt}\0{k}".encode(), digest_size=8).digest(), "big")
            for k in keys
        ],
        dtype=np.float64,
    )
    return u / 2.0**64


def carve(keys: Sequence[str], seed: int, lo: float, hi: float) -> np.ndarray:
    """The rows whose ``u(seed, key)`` lies in ``[lo, hi)`` (see the module docstring)."""
    u = key_unit(keys, str(seed))
    return (u >= lo) & (u < hi)


# --------------------------------------------------------------------------- files


def open_root(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``root`` and the folder inside it; one clear error when it is none."""
    from twa_ray.storage import absolute, filesystem_from_uri

    try:
        fs, base = filesystem_from_uri(absolute(root))
        info = fs.get_file_info(base)
    except (pa.ArrowException, OSError, ValueError) as e:
        msg = redact(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise _fail(
            root, f"cannot be opened ({msg})", "give a local folder or an s3:// / gs:// URI"
        ) from None
    if info.type != pafs.FileType.Directory:
        what = "does not exist" if info.type == pafs.FileType.NotFound else "is a file"
        raise _fail(root, f"is not a folder ({what})", "give the folder that holds the dataset")
    return fs, base.rstrip("/")


def _files(fs: pafs.FileSystem, base: str, suffixes: tuple[str, ...]) -> list[str]:
    """Relative paths of the files under ``base`` ending in ``suffixes``, sorted."""
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(
        posixpath.relpath(i.path, base)
        for i in infos
        if i.type == pafs.FileType.File and i.path.lower().endswith(suffixes)
    )


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def _by_split(rel: list[str]) -> dict[str, list[str]]:
    """Files grouped by their top folder when a ``train`` folder exists, else all in train."""
    if not any(r.split("/", 1)[0] == "train" for r in rel):
        return {"train": rel}
    out: dict[str, list[str]] = {}
    for r in rel:
        top, _, rest = r.partition("/")
        if rest and top in SPLIT_FOLDERS:
            out.setdefault(SPLIT_FOLDERS[top], []).append(r)
    return out


def decode_image(data: bytes, name: str, root: str) -> np.ndarray:
    """An image file's bytes -> uint8 (C, H, W), C = 1 for grayscale, else 3 (RGB)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("L" if img.mode in ("1", "L", "I;16", "I", "F") else "RGB")
    except Exception as e:
        raise _fail(
            root, f"{name} is not a readable image ({type(e).__name__})", "remove or replace it"
        ) from None
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _stack_images(images: list[np.ndarray], names: list[str], root: str) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        first = images[0].shape
        odd = next(i for i, im in enumerate(images) if im.shape != first)
        raise _fail(
            root,
            f"images of different sizes ({names[0]} is {first}, {names[odd]} is "
            f"{images[odd].shape})",
            "resize them to one size first",
        )
    return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)


# --------------------------------------------------------------------------- columns


def _feature_columns(
    table: pa.Table, features: Sequence[str] | None, label: str, where: str, root: str
) -> list[str]:
    """The feature column names, with them and the label column checked against ``table``."""
    names = table.column_names
    if label not in names:
        raise _fail(
            root,
            f"{where} has no label column {label!r} (columns: {', '.join(names)})",
            "name it with --label-column",
        )
    cols = list(features) if features else [c for c in names if c != label]
    missing = [c for c in cols if c not in names]
    if missing or not cols:
        raise _fail(
            root,
            f"{where} has no feature column(s) {missing or cols} (columns: {', '.join(names)})",
            "name them with --feature-columns a,b,...",
        )
    return cols


def _features(table: pa.Table, cols: list[str], where: str, root: str) -> np.ndarray:
    """The feature columns as one array (N, ...): a list column, an image column, or scalars."""
    if len(cols) == 1:
        col = table.column(cols[0]).combine_chunks()
        if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
            raw = col.field("bytes").to_pylist()
            images = [decode_image(b, f"{where} row {i}", root) for i, b in enumerate(raw)]
            return _stack_images(images, [f"row {i}" for i in range(len(raw))], root)
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lengths = set(np.diff(col.offsets.to_numpy()).tolist()) or {0}
            if len(lengths) > 1:
                raise _fail(root, f"{where}: rows of {cols[0]!r} differ in length", "pad them")
            width = lengths.pop()
        else:
            width = -1
        if width >= 0:
            values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            return values.reshape(len(col), width)
    try:
        return np.stack(
            [table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in cols], 1
        )
    except (ValueError, TypeError, pa.ArrowException):
        raise _fail(
            root,
            f"{where}: the feature columns {cols} are not numbers, a list column or an image column",
            "choose them with --feature-columns",
        ) from None


def _labels(table: pa.Table, label: str, where: str, root: str) -> np.ndarray:
    col = table.column(label)
    if not (pa.types.is_integer(col.type) or pa.types.is_dictionary(col.type)):
        raise _fail(
            root,
            f"{where}: the label column {label!r} is {col.type}, not integer class indices",
            "give another --label-column",
        )
    if pa.types.is_dictionary(col.type):
        col = pa.chunked_array([c.indices for c in col.chunks])
    y = col.to_numpy(zero_copy_only=False).astype(np.int64)
    if len(y) and y.min() < 0:
        raise _fail(root, f"{where}: negative labels in {label!r}", "labels are 0 .. C - 1")
    return y


def _table_rows(table: pa.Table, opts: dict[str, Any], where: str, key: str, root: str) -> _Rows:
    label = opts["label"]
    cols = _feature_columns(table, opts["features"], label, where, root)
    x = _features(table, cols, where, root)
    y = _labels(table, label, where, root)
    return _Rows([f"{key}#{i}" for i in range(len(y))], x, y)


# --------------------------------------------------------------------------- readers


def _concat(
    parts: list[_Rows], root: str, what: str = "files with different feature shapes"
) -> _Rows:
    parts = [p for p in parts if p.keys] or parts[:1]
    shapes = {p.x.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise _fail(root, f"{what} {sorted(shapes)}", "make them one")
    return _Rows(
        [k for p in parts for k in p.keys],
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
    )


def read_units(kind: str, fs: pafs.FileSystem, base: str, root: str) -> dict[str, list[str]]:
    """Each split's read units in key order: its ``.parquet`` files, its image files, or (hf_disk)
    its one split folder (its row keys number the rows of all its Arrow files)."""
    if kind == "hf_disk":
        return {split: [folder] for split, folder in _hf_folders(fs, base, root).items()}
    if kind == "parquet":
        rel = _files(fs, base, (".parquet",))
        if not rel:
            raise _fail(root, "holds no .parquet files", "check the path (and the bucket's prefix)")
        return _by_split(rel)
    rel = [r for r in _files(fs, base, IMAGE_SUFFIXES) if "/" in r]
    if not rel:
        raise _fail(
            root,
            "holds no images in class folders (<split>/<class>/<file> or <class>/<file>)",
            "check the path, or use --dataset parquet for tables",
        )
    return _by_split(rel)


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _hf_folders(fs: pafs.FileSystem, base: str, root: str) -> dict[str, str]:
    """hf_disk: split name -> its folder ("" for a single ``Dataset``)."""
    if fs.get_file_info(f"{base}/dataset_dict.json").type == pafs.FileType.File:
        names = _read_json(fs, f"{base}/dataset_dict.json")["splits"]
        folders = {SPLIT_FOLDERS.get(n, n): n for n in names}
        return {s: f for s, f in folders.items() if s in ("train", "val", "test")}
    if fs.get_file_info(f"{base}/state.json").type == pafs.FileType.File:
        return {"train": ""}
    raise _fail(
        root,
        "is not a save_to_disk folder (no dataset_dict.json or state.json)",
        "save the dataset with Dataset.save_to_disk / DatasetDict.save_to_disk",
    )


def _hf_classes(fs: pafs.FileSystem, base: str, folder: str, label: str) -> int | None:
    """hf_disk: the number of names of a ``ClassLabel`` label column, or None."""
    sub = f"{folder}/" if folder else ""
    info = _read_json(fs, f"{base}/{sub}dataset_info.json").get("features", {})
    names = info.get(label, {}).get("names")
    return len(names) if names else None


def read_unit(
    kind: str, fs: pafs.FileSystem, base: str, root: str, opts: dict[str, Any], unit: str
) -> _Rows:
    """The rows of one read unit (:func:`_units`; images: use :func:`read_images`)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        return _table_rows(pq.read_table(f"{base}/{unit}", filesystem=fs), opts, unit, unit, root)
    sub = f"{unit}/" if unit else ""
    files = [f["filename"] for f in _read_json(fs, f"{base}/{sub}state.json")["_data_files"]]
    batches = []
    for name in files:
        with fs.open_input_stream(f"{base}/{sub}{name}") as f:
            batches.append(pa.ipc.open_stream(f).read_all())
    return _table_rows(pa.concat_tables(batches), opts, unit or "train", unit or "train", root)


def image_classes(names: Sequence[str]) -> list[str]:
    """The class names of image files ``.../<class>/<file>``, sorted."""
    return sorted({r.split("/")[-2] for r in names})


def read_images(
    fs: pafs.FileSystem, base: str, root: str, names: Sequence[str], classes: Sequence[str]
) -> _Rows:
    """Image files decoded to uint8 (N, C, H, W), labelled by their class folder's index."""
    images = [decode_image(read_bytes(fs, f"{base}/{r}"), r, root) for r in names]
    y = np.array([classes.index(r.split("/")[-2]) for r in names], dtype=np.int64)
    return _Rows(list(names), _stack_images(images, list(names), root), y)


def _read_splits(
    kind: str, fs: pafs.FileSystem, base: str, root: str, opts: dict[str, Any]
) -> tuple[dict[str, _Rows], int | None]:
    """Every split as given by the data (train, and val / test where present), and the number
    of classes the data names (image class folders, a ``ClassLabel``), if any."""
    units = read_units(kind, fs, base, root)
    if kind == "images":
        classes = image_classes(units.get("train", []))
        for split, names in units.items():
            unknown = sorted(set(image_classes(names)) - set(classes))
            if unknown:
                raise _fail(
                    root,
                    f"{split} has class folders {unknown} that train lacks",
                    "use train's classes",
                )
        splits = {s: read_images(fs, base, root, names, classes) for s, names in units.items()}
        _concat(list(splits.values()), root, what="images of different sizes")
        return splits, len(classes)
    splits = {
        s: _concat([read_unit(kind, fs, base, root, opts, u) for u in names], root)
        for s, names in units.items()
    }
    if kind == "parquet":
        return splits, None
    counts = [_hf_classes(fs, base, u[0], opts["label"]) for u in units.values()]
    return splits, next((c for c in reversed(counts) if c), None)


def _carve_missing(splits: dict[str, _Rows], val_frac: float, seed: int) -> dict[str, _Rows]:
    """Val (and test) carved out of train where the data gave none (module docstring)."""
    train = splits["train"]
    if "val" not in splits:
        is_val = carve(train.keys, seed, 0.0, val_frac)
        splits["val"], train = train.take(is_val), train.take(~is_val)
    if "test" not in splits:
        is_test = carve(train.keys, seed, val_frac, 2 * val_frac)
        splits["test"], train = train.take(is_test), train.take(~is_test)
    splits["train"] = train
    return splits


def load_uri_dataset(
    kind: str,
    root: str | None,
    *,
    val_frac: float = 0.1,
    seed: int = 0,
    num_samples: int | None = None,
    feature_columns: Sequence[str] | None = None,
    label_column: str = DEFAULT_LABEL,
) -> DataSplits:
    """``kind`` (one of :data:`URI_DATASETS`) read from ``root`` into :class:`DataSplits` (the
    splits and their rule: the module docstring); every problem is one ``ValueError`` naming
    the option that fixes it."""
    from twa_ray.data.splits import DataSplits, RowsDataset

    if not root:
        raise ValueError(f"--dataset {kind} reads --data-root; give a folder or an s3:// URI")
    fs, base = open_root(root)
    opts = {"features": feature_columns, "label": label_column}
    splits, num_classes = _read_splits(kind, fs, base, root, opts)
    if "train" not in splits:
        raise _fail(root, "has no train split", "put the training rows under train/")
    splits = _carve_missing(splits, val_frac, seed)
    if num_samples is not None:
        keep = np.arange(len(splits["train"].keys)) < num_samples
        splits["train"] = splits["train"].take(keep)
    for name in ("train", "val", "test"):
        if not splits[name].keys:
            raise _fail(
                root,
                f"the {name} split is empty ({sum(len(s.keys) for s in splits.values())} rows in "
                f"all, val_frac {val_frac})",
                "give more rows or another --val-frac",
            )
    top = max(int(s.y.max()) for s in splits.values()) + 1
    if num_classes is not None and top > num_classes:
        raise _fail(root, f"label {top - 1} >= the {num_classes} class names", "fix the labels")
    ds = {n: RowsDataset(s.x, s.y, s.keys) for n, s in splits.items()}
    return DataSplits(
        train=ds["train"],
        val=ds["val"],
        test=ds["test"],
        num_classes=num_classes or top,
        input_shape=tuple(int(d) for d in splits["train"].x.shape[1:]),
    )

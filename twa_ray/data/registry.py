"""``load_dataset(name, ...)``: the one entry point from a dataset name to :class:`DataSplits`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from twa_ray.data.splits import DataSplits, check_val_frac, held_out_split
from twa_ray.data.uri import DEFAULT_LABEL, URI_DATASETS
from twa_ray.importpath import call_with_accepted, is_import_path, load_callable

if TYPE_CHECKING:
    from twa_ray.config import DataConfig

__all__ = ["DATASETS", "load_data", "load_dataset", "splits_from_user"]

log = logging.getLogger(__name__)

DATASETS = ("mnist1d", "cifar10", "cifar100", "imagefolder", *URI_DATASETS)
"""Built-in dataset names; anything of the form ``"pkg.module:function"`` is a user dataset."""


def load_data(data: DataConfig) -> DataSplits:
    """:func:`load_dataset` with the options of a ``DataConfig``."""
    return load_dataset(
        data.dataset,
        root=data.data_root,
        val_frac=data.val_frac,
        seed=data.seed,
        num_samples=data.num_samples,
        feature_columns=data.feature_columns,
        label_column=data.label_column,
    )


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    val_frac: float = 0.1,
    seed: int = 0,
    num_samples: int | None = None,
    image_size: int = 224,
    augment: bool = True,
    feature_columns: str | Sequence[str] | None = None,
    label_column: str = DEFAULT_LABEL,
) -> DataSplits:
    """Build the train / held-out val / test splits of a dataset.

    Args:
        name: ``"mnist1d"`` (generated locally by the ``mnist1d`` package, cached under
            ``root``), ``"cifar10"`` / ``"cifar100"`` (official binary or python files under
            ``root``), ``"imagefolder"`` (``root/train`` + ``root/val`` and/or ``root/test``),
            ``"parquet"`` / ``"images"`` / ``"hf_disk"`` (read from ``root``, a folder or any
            storage URI: :mod:`twa_ray.data.uri`), or ``"pkg.module:function"`` (a user
            function, see :func:`splits_from_user`).
        root: data directory (for ``mnist1d``: the cache directory; a URI for the URI datasets).
        val_frac: fraction of the training data held out as ``val`` (never trained on).
        seed: seed of the train/val permutation.
        num_samples: dataset size knob: for ``mnist1d`` the number generated (default 12,500
            -> 10k train+val / 2.5k test); for the others a cap on the training images
            (smoke tests).
        image_size: crop size for ``imagefolder``.
        augment: train-split augmentation for the image datasets.
        feature_columns: parquet / hf_disk feature columns (a list or ``"a,b"``; default: all
            but the label).
        label_column: parquet / hf_disk label column.

    Returns:
        :class:`DataSplits` whose datasets yield ``(x float32, y int64)``.

    Raises:
        ValueError: unknown name (the message lists the choices) or a bad argument.
        FileNotFoundError: the files of a local dataset are missing (the message says
            which files are expected and where to get them).

    >>> splits = load_dataset("mnist1d", num_samples=1000)   # doctest: +SKIP
    >>> splits.sizes(), splits.num_classes, splits.input_shape  # doctest: +SKIP
    ({'train': 720, 'val': 80, 'test': 200}, 10, (40,))
    """
    check_val_frac(val_frac)
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
    common: dict[str, Any] = {
        "root": root,
        "val_frac": val_frac,
        "seed": seed,
        "num_samples": num_samples,
    }
    if name == "mnist1d":
        from twa_ray.data.mnist1d import load_mnist1d

        return load_mnist1d(**common)
    if name in ("cifar10", "cifar100"):
        from twa_ray.data.cifar import load_cifar

        return load_cifar(name, augment=augment, **common)  # type: ignore[arg-type]
    if name == "imagefolder":
        from twa_ray.data.imagefolder import load_imagefolder

        return load_imagefolder(image_size=image_size, augment=augment, **common)
    if name in URI_DATASETS:
        from twa_ray.data.uri import load_uri_dataset

        if isinstance(feature_columns, str):
            feature_columns = [c.strip() for c in feature_columns.split(",") if c.strip()]
        return load_uri_dataset(
            name, feature_columns=feature_columns, label_column=label_column, **common
        )
    if isinstance(name, str) and is_import_path(name):
        fn = load_callable(name)
        return splits_from_user(
            call_with_accepted(fn, common), val_frac=val_frac, seed=seed, source=name
        )
    raise ValueError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
        "or give a user function as 'package.module:function'"
    )


# --------------------------------------------------------------------------- user datasets


def splits_from_user(
    result: Any, *, val_frac: float = 0.1, seed: int = 0, source: str = "user function"
) -> DataSplits:
    """Normalize what a user dataset function returned into :class:`DataSplits`.

    The function ``"pkg.module:function"`` is called with those of ``root``, ``val_frac``,
    ``seed``, ``num_samples`` that its signature accepts (all of them if it takes
    ``**kwargs``; none if it takes no arguments). It may return:

    - a :class:`DataSplits` (used as is);
    - a tuple/list ``(train, val, test)`` or ``(train, val, test, num_classes)``;
    - a dict with keys ``"train"``, ``"test"`` and optionally ``"val"``, ``"num_classes"``,
      ``"input_shape"``.

    Each split is a map-style ``Dataset`` of ``(x, y)`` or a ``DataLoader`` (its
    ``.dataset`` is used: batching is the pipeline's business). ``val=None`` holds out
    ``val_frac`` of ``train`` (seeded), as for the built-in datasets. A missing
    ``input_shape`` is the shape of the first training ``x``; a missing ``num_classes``
    comes from the dataset's ``classes`` / ``num_classes`` / ``targets`` attribute, else
    from the largest label of the training split plus one (a full pass over it).
    """
    if isinstance(result, DataSplits):
        return result
    num_classes: Any = None
    input_shape: Any = None
    if isinstance(result, Mapping):
        unknown = set(result) - {"train", "val", "test", "num_classes", "input_shape"}
        missing = {"train", "test"} - set(result)
        if unknown or missing:
            raise ValueError(
                f"{source} returned a dict with keys {sorted(result)}: it needs 'train' and "
                "'test', and may have 'val', 'num_classes', 'input_shape'"
                + (f" (unknown: {sorted(unknown)})" if unknown else "")
            )
        train, val, test = result["train"], result.get("val"), result["test"]
        num_classes, input_shape = result.get("num_classes"), result.get("input_shape")
    elif isinstance(result, (tuple, list)) and len(result) in (3, 4):
        train, val, test = result[:3]
        num_classes = result[3] if len(result) == 4 else None
    else:
        raise ValueError(
            f"{source} returned {type(result).__name__}; expected DataSplits, "
            "(train, val, test[, num_classes]) or a dict with 'train', 'val', 'test'"
        )
    train, val, test = (
        _as_dataset(d, split, source)
        for d, split in ((train, "train"), (val, "val"), (test, "test"))
    )
    if train is None or test is None:
        raise ValueError(f"{source}: the train and test splits are required, got None")
    if val is None:
        if not isinstance(train, Sized):
            raise ValueError(f"{source}: val=None needs a train dataset with __len__ to split")
        train_idx, val_idx = held_out_split(len(train), val_frac, seed)
        train, val = Subset(train, train_idx.tolist()), Subset(train, val_idx.tolist())
    if input_shape is None or num_classes is None:
        x0, _ = _first_sample(train, source)
        if input_shape is None:
            input_shape = tuple(torch.as_tensor(x0).shape)
        if num_classes is None:
            num_classes = _infer_num_classes(train, source)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in input_shape),
    )


def _as_dataset(d: Any, split: str, source: str) -> Dataset[Any] | None:
    if d is None:
        return None
    if isinstance(d, DataLoader):
        return d.dataset
    if not isinstance(d, Dataset) and not (hasattr(d, "__getitem__") and hasattr(d, "__len__")):
        raise ValueError(
            f"{source}: the {split} split is a {type(d).__name__}, not a Dataset or DataLoader"
        )
    return d


def _first_sample(ds: Dataset[Any], source: str) -> tuple[Any, Any]:
    try:
        item = ds[0]
    except Exception as e:
        raise ValueError(f"{source}: cannot read the first training example: {e}") from e
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"{source}: training examples must be (x, y) pairs, got {type(item).__name__}"
        )
    x, y = item
    yt = torch.as_tensor(y)
    if yt.numel() != 1 or yt.is_floating_point() or yt.is_complex():
        raise ValueError(
            f"{source}: labels must be integer class indices, got {type(y).__name__} "
            f"{getattr(y, 'dtype', '')} of shape {tuple(yt.shape)}"
        )
    return x, y


def _infer_num_classes(ds: Dataset[Any], source: str) -> int:
    base: Any = ds.dataset if isinstance(ds, Subset) else ds
    if isinstance(getattr(base, "num_classes", None), int):
        return int(base.num_classes)
    classes = getattr(base, "classes", None)
    if isinstance(classes, Sequence) and len(classes) > 0:
        return len(classes)
    if isinstance(base, TensorDataset) and len(base.tensors) >= 2:
        labels = base.tensors[1]
    elif (targets := getattr(base, "targets", None)) is not None and len(targets) > 0:
        labels = torch.as_tensor(targets)
    else:
        if not isinstance(ds, Sized):
            raise ValueError(f"{source}: cannot infer num_classes; return it with the splits")
        log.warning("%s: num_classes not given, scanning %d training labels", source, len(ds))
        labels = torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])
    if labels.numel() == 0:
        raise ValueError(f"{source}: cannot infer num_classes from an empty train split")
    return int(labels.max()) + 1

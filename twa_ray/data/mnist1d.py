"""MNIST-1D (Greydanus & Kobak, https://arxiv.org/abs/2011.14439), generated locally.

The ``mnist1d`` package builds the data procedurally from ten 1-D digit templates
(padding, shear, translation, correlated and i.i.d. noise), then standardizes the
whole set to zero mean and unit std and cuts it 80/20 into train/test. We call
``mnist1d.data.make_dataset`` with the package's default arguments (generation seed
42) and only ``num_samples`` raised, and never ``get_dataset`` (it downloads).

Generation is a Python loop (~10 s for 12,500 samples on one core), so the arrays are
cached as ``.npz`` (no pickle) keyed by the package version and the arguments.

Defaults: 12,500 samples -> 10,000 train / 2,500 test (the test bed of
bench/claims.py, results in bench/RESULTS.md), then ``val_frac`` of the 10,000 is held out as validation
(9,000 / 1,000 / 2,500 with ``val_frac=0.1``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from twa_ray.core.atomic import atomic_path
from twa_ray.data.splits import DataSplits, held_out_split

__all__ = ["DEFAULT_NUM_SAMPLES", "default_cache_dir", "generate_mnist1d", "load_mnist1d"]

log = logging.getLogger(__name__)

DEFAULT_NUM_SAMPLES = 12_500  # 80/20 split -> 10k train (incl. val) / 2.5k test
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning
_KEYS = ("x", "y", "x_test", "y_test")


def default_cache_dir() -> Path:
    """``$TWA_RAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/twa_ray``, else ``~/.cache/twa_ray``."""
    env = os.environ.get("TWA_RAY_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "twa_ray"


def _package_version() -> str:
    try:
        return metadata.version("mnist1d")
    except metadata.PackageNotFoundError:
        return "unknown"


def _dataset_args(num_samples: int) -> dict[str, Any]:
    import mnist1d.data  # slow import (pulls matplotlib): only when generating

    args: dict[str, Any] = mnist1d.data.get_dataset_args(as_dict=True)
    args["num_samples"] = int(num_samples)
    return args


def _make(num_samples: int) -> dict[str, np.ndarray]:
    import mnist1d.data
    from mnist1d.utils import ObjectView

    args = _dataset_args(num_samples)
    # make_dataset reseeds the global `random` and `numpy.random` generators: restore
    # them so that loading data never changes the caller's random streams.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        ds = mnist1d.data.make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.ascontiguousarray(ds["x"], dtype=np.float32),
        "y": np.ascontiguousarray(ds["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(ds["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(ds["y_test"], dtype=np.int64),
    }


def _cache_path(cache_dir: Path, num_samples: int) -> Path:
    key = json.dumps(
        {"format": _CACHE_FORMAT, "mnist1d": _package_version(), "num_samples": num_samples},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / "mnist1d" / f"mnist1d-n{num_samples}-{digest}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _KEYS}
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated / foreign file: regenerate rather than fail
        log.warning("ignoring unreadable MNIST-1D cache %s (%s); regenerating", path, e)
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: readers never see a partial file; concurrent writers (several Ray workers
        # on one node) just race to rename
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
    except OSError as e:
        log.warning("could not cache MNIST-1D at %s (%s); continuing without a cache", path, e)


def generate_mnist1d(
    num_samples: int | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, np.ndarray]:
    """Generate (or read from the cache) the MNIST-1D arrays.

    Args:
        num_samples: total number of examples before the 80/20 train/test cut
            (rounded down to a multiple of 10 by ``mnist1d``); default 12,500.
        cache_dir: cache directory (default :func:`default_cache_dir`).

    Returns:
        ``{"x": float32 (N_train, 40), "y": int64 (N_train,), "x_test": ..., "y_test": ...}``.
    """
    n = DEFAULT_NUM_SAMPLES if num_samples is None else int(num_samples)
    if n < 10:
        raise ValueError(f"num_samples must be >= 10 (10 classes), got {num_samples!r}")
    path = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), n)
    arrays = _read_cache(path)
    if arrays is None:
        log.info("generating MNIST-1D with %d samples (cached at %s)", n, path)
        arrays = _make(n)
        _write_cache(path, arrays)
    return arrays


def load_mnist1d(
    *,
    root: str | os.PathLike[str] | None = None,
    val_frac: float = 0.1,
    seed: int = 0,
    num_samples: int | None = None,
) -> DataSplits:
    """MNIST-1D as :class:`DataSplits` of ``TensorDataset`` s (x float32 (40,), y int64).

    Args:
        root: cache directory for the generated arrays (default :func:`default_cache_dir`).
        val_frac: fraction of the generated train part held out as ``val``.
        seed: seed of the train/val permutation (the data itself is generated with
            ``mnist1d``'s fixed seed, so every seed sees the same train+val and test sets).
        num_samples: total examples before the 80/20 train/test cut (default 12,500).

    The datasets are ``torch.utils.data.TensorDataset``: ``.tensors`` gives the whole
    split, and indexing with a list of indices returns a batch in one call.
    """
    a = generate_mnist1d(num_samples, cache_dir=root)
    x, y = torch.from_numpy(a["x"]), torch.from_numpy(a["y"])
    train_idx, val_idx = held_out_split(len(y), val_frac, seed)
    return DataSplits(
        train=TensorDataset(x[train_idx], y[train_idx]),
        val=TensorDataset(x[val_idx], y[val_idx]),
        test=TensorDataset(torch.from_numpy(a["x_test"]), torch.from_numpy(a["y_test"])),
        num_classes=10,
        input_shape=(int(x.shape[1]),),
    )

"""CIFAR-10 / CIFAR-100 from a local copy of the official files (nothing is downloaded).

Both official on-disk versions are read (https://www.cs.toronto.edu/~kriz/cifar.html):

- **binary**: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` + ``test_batch.bin``, each
  record ``<1 label byte><3072 pixel bytes>``; ``cifar-100-binary/train.bin`` + ``test.bin``,
  each record ``<1 coarse byte><1 fine byte><3072 pixel bytes>`` (we use the fine labels).
- **python**: ``cifar-10-batches-py/data_batch_{1..5}`` + ``test_batch``;
  ``cifar-100-python/train`` + ``test``: pickled dicts with ``b"data"`` (uint8 N x 3072)
  and ``b"labels"`` / ``b"fine_labels"``. They are read with :class:`RestrictedUnpickler`,
  which only rebuilds numpy arrays: a pickle can run arbitrary code, and a dataset
  directory is not a trusted source.

Pixels are stored channel-major (1024 R, 1024 G, 1024 B, rows of 32) in both versions,
so ``data.reshape(N, 3, 32, 32)`` is the image.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from twa_ray.data.splits import DataSplits, held_out_split

__all__ = [
    "CIFAR_MEAN_STD",
    "CifarDataset",
    "RestrictedUnpickler",
    "load_cifar",
    "read_cifar_arrays",
    "restricted_pickle_load",
]

IMAGE_BYTES = 3 * 32 * 32

# per-channel mean / std of the training images (the values used across the CIFAR literature)
CIFAR_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_LAYOUT = {
    # name: (binary dir, binary train files, binary test files, label bytes,
    #        python dir, python train files, python test files, python label key)
    "cifar10": (
        "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)],
        ["test_batch.bin"],
        1,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    "cifar100": (
        "cifar-100-binary",
        ["train.bin"],
        ["test.bin"],
        2,
        "cifar-100-python",
        ["train"],
        ["test"],
        b"fine_labels",
    ),
}
_URL = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz "
    "(or cifar-10-python.tar.gz)",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz "
    "(or cifar-100-python.tar.gz)",
}


# --------------------------------------------------------------------------- safe unpickling


def _safe_dtype(*args: Any, **kwargs: Any) -> np.dtype[Any]:
    # Plain numeric dtypes only: an object (or structured/void, which can carry object
    # fields through its pickled state) array could turn raw bytes into object pointers.
    dt: np.dtype[Any] = np.dtype(*args, **kwargs)
    if dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
        raise pickle.UnpicklingError(
            f"refusing numpy dtype {dt!r} in a dataset pickle (only bool/int/uint/float arrays)"
        )
    return dt


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1"); allow only that
    # (an arbitrary codec name would make the unpickler import modules by name).
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode(..., {encoding!r}) in a pickle")
    return text.encode("latin1")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    return {
        # ndarray.__reduce__ (pickle protocols 0-4; the official files are protocol 2)
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        # ndarray.__reduce_ex__(5): arrays re-pickled by numpy >= 1.16 at protocol 5
        ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
        # bytes pickled by Python 3 at protocol < 3
        ("_codecs", "encode"): _latin1_encode,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only reconstructs numpy arrays (and plain containers/bytes).

    ``find_class`` allows the numpy array reconstruction globals and nothing else
    (``numpy.core.multiarray._reconstruct``, ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray``, ``numpy.dtype`` (plain bool/int/uint/float only), ``numpy[._]core.numeric._frombuffer``
    (numpy's protocol-5 form) and ``_codecs.encode`` restricted to latin-1 (how Python 3 writes
    bytes at protocol 2)); any other global — ``os.system``, ``builtins.open``,
    ``builtins.eval`` ... — raises ``pickle.UnpicklingError`` before it is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} from a dataset pickle: only numpy "
            "arrays may be reconstructed (is this really an official CIFAR file?)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id in a dataset pickle")


def restricted_pickle_load(path: str | os.PathLike[str]) -> Any:
    """Load a CIFAR python-version pickle with :class:`RestrictedUnpickler`.

    ``encoding="bytes"`` keeps the Python 2 strings of the official files as ``bytes``
    (hence the ``b"data"`` keys).
    """
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from e
        except Exception as e:  # truncated or garbage bytes: EOFError, KeyError, ValueError, ...
            raise pickle.UnpicklingError(
                f"{path} is not a readable pickle ({type(e).__name__}: {e})"
            ) from e


# --------------------------------------------------------------------------- readers


def _read_binary(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + IMAGE_BYTES
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"{path}: size {raw.size} bytes is not a multiple of the {record}-byte CIFAR record"
        )
    raw = raw.reshape(-1, record)
    labels = raw[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: byte 0 coarse, 1 fine
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32)
    return images, labels


def _read_python(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = restricted_pickle_load(path)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{e}; only numpy arrays are unpickled, nothing else is run: replace the file from "
            "the official CIFAR archive (or use its binary version)"
        ) from None
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with b'data' and {label_key!r}, got {keys}")
    data = np.asarray(obj[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise ValueError(
            f"{path}: b'data' must be uint8 (N, {IMAGE_BYTES}), got {data.dtype} {data.shape}"
        )
    labels = np.asarray(obj[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def _find_dir(root: Path, sub: str, files: Sequence[str]) -> Path | None:
    """``root/sub`` or ``root`` itself, whichever holds all of ``files``."""
    for d in (root / sub, root):
        if all((d / f).is_file() for f in files):
            return d
    return None


def read_cifar_arrays(
    name: Literal["cifar10", "cifar100"], root: str | os.PathLike[str]
) -> dict[str, np.ndarray]:
    """Read the official CIFAR files under ``root`` (binary version preferred).

    ``root`` may be the directory that holds ``cifar-10-batches-bin`` (etc.) or that
    folder itself. Returns ``{"x": uint8 (N, 3, 32, 32), "y": int64 (N,), "x_test", "y_test"}``.
    """
    bin_dir, bin_train, bin_test, label_bytes, py_dir, py_train, py_test, label_key = _LAYOUT[name]
    root = Path(root).expanduser()
    out: dict[str, list[np.ndarray]] = {"x": [], "y": [], "x_test": [], "y_test": []}
    if (d := _find_dir(root, bin_dir, bin_train + bin_test)) is not None:
        for split, files in (("", bin_train), ("_test", bin_test)):
            for f in files:
                x, y = _read_binary(d / f, label_bytes)
                out["x" + split].append(x)
                out["y" + split].append(y)
    elif (d := _find_dir(root, py_dir, py_train + py_test)) is not None:
        for split, files in (("", py_train), ("_test", py_test)):
            for f in files:
                x, y = _read_python(d / f, label_key)
                out["x" + split].append(x)
                out["y" + split].append(y)
    else:
        raise FileNotFoundError(
            f"{name}: no CIFAR files under {str(root)!r}. Expected either the binary version "
            f"{root / bin_dir}/{{{','.join(bin_train + bin_test)}}} or the python version "
            f"{root / py_dir}/{{{','.join(py_train + py_test)}}}. Download and extract "
            f"{_URL[name]} into {str(root)!r}."
        )
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    num_classes = 10 if name == "cifar10" else 100
    for k in ("y", "y_test"):
        if arrays[k].size and (arrays[k].min() < 0 or arrays[k].max() >= num_classes):
            raise ValueError(f"{name} under {root}: labels outside 0..{num_classes - 1}")
    return arrays


# --------------------------------------------------------------------------- dataset


class CifarDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Items ``(x float32 (3, 32, 32) normalized, y int64)`` over shared uint8 storage.

    With ``augment=True`` each item is randomly cropped from the image zero-padded by 4
    pixels and flipped horizontally with probability 1/2 (the standard CIFAR recipe),
    using the global torch RNG (DataLoader workers get distinct seeds).

    Args:
        images: uint8 (N, 3, 32, 32) storage, shared between the splits (not copied).
        labels: int64 (N,).
        indices: the rows of ``images`` that form this split (default all).
        mean, std: per-channel normalization, in [0, 1] pixel units.
        augment: random crop + flip (train split only).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        indices: torch.Tensor | None = None,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ):
        self.images = images
        self.labels = labels
        self.indices = torch.arange(len(labels)) if indices is None else indices
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> torch.Tensor:
        """The labels of this split, int64 (len(self),)."""
        return self.labels[self.indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.indices[i])
        img = self.images[j]  # (3, 32, 32) uint8
        if self.augment:
            padded = F.pad(img, (4, 4, 4, 4))  # (3, 40, 40), zero padding
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            img = padded[:, dy : dy + 32, dx : dx + 32]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        x = (img.to(torch.float32) / 255.0 - self.mean) / self.std
        return x, self.labels[j]


def load_cifar(
    name: Literal["cifar10", "cifar100"],
    *,
    root: str | os.PathLike[str] | None,
    val_frac: float = 0.1,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = True,
) -> DataSplits:
    """CIFAR-10/100 as :class:`DataSplits`: ``val_frac`` of the 50k training images held out.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: directory holding the extracted official files (see :func:`read_cifar_arrays`).
        val_frac: fraction of the training images held out as ``val`` (seeded permutation).
        seed: seed of the permutation.
        num_samples: if given, keep only the first ``num_samples`` training images (before
            the val split) — for smoke tests; the test split is kept whole.
        augment: random crop + flip on the train split (val and test are never augmented).
    """
    if root is None:
        raise FileNotFoundError(
            f"{name}: pass root=<directory with the extracted official CIFAR files> "
            f"(download {_URL[name]})"
        )
    a = read_cifar_arrays(name, root)
    images, labels = torch.from_numpy(a["x"]), torch.from_numpy(a["y"])
    if num_samples is not None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples!r}")
        images, labels = images[:num_samples], labels[:num_samples]
    train_idx, val_idx = held_out_split(len(labels), val_frac, seed)
    mean, std = CIFAR_MEAN_STD[name]
    x_test, y_test = torch.from_numpy(a["x_test"]), torch.from_numpy(a["y_test"])
    return DataSplits(
        train=CifarDataset(images, labels, indices=train_idx, mean=mean, std=std, augment=augment),
        val=CifarDataset(images, labels, indices=val_idx, mean=mean, std=std),
        test=CifarDataset(x_test, y_test, mean=mean, std=std),
        num_classes=10 if name == "cifar10" else 100,
        input_shape=(3, 32, 32),
    )

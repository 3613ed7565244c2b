"""The :class:`DataSplits` container and the seeded train/val hold-out split.

TWA-v learns its coefficients on a validation split that the sampling phase
never trained on, so every dataset here carries three disjoint splits:
``train`` (SGD and BN statistics), ``val`` (held out of train by a seeded
permutation) and ``test`` (reporting only).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["DataSplits", "RowsDataset", "held_out_split", "check_val_frac", "val_digest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSplits:
    """Train / held-out val / test datasets of one task.

    Each split is a map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)``
    with ``x`` a float32 tensor of shape ``input_shape`` and ``y`` an int64 class index.
    """

    train: Dataset[Any]
    """Training split: the sampling phase trains on it, BN statistics are estimated on it."""
    val: Dataset[Any]
    """Held out of training (seeded permutation); TWA-v optimizes its coefficients here."""
    test: Dataset[Any]
    """Reporting only."""
    num_classes: int
    """Number of classes; labels are ``0 .. num_classes - 1``."""
    input_shape: tuple[int, ...]
    """Shape of one ``x`` (without the batch dimension), e.g. ``(40,)`` or ``(3, 32, 32)``."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        shape = tuple(self.input_shape)
        if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(
                f"input_shape must be a non-empty tuple of positive ints, got {self.input_shape!r}"
            )
        object.__setattr__(self, "input_shape", shape)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split (``-1`` for a split without ``__len__``)."""
        return {
            name: len(ds) if isinstance(ds, Sized) else -1
            for name, ds in (("train", self.train), ("val", self.val), ("test", self.test))
        }

    def summary(self) -> dict[str, Any]:
        """``metrics.json`` -> ``data``: the split sizes and :func:`val_digest` of ``val``."""
        return {**self.sizes(), "val_digest": val_digest(self.val)}


class RowsDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Rows held in memory (the URI datasets, :mod:`twa_ray.data.uri`): ``x`` (float32, or uint8
    images scaled to [0, 1] when read), ``y`` int64 and each row's ``keys`` (what
    :func:`val_digest` hashes)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, keys: Sequence[str]) -> None:
        self.x, self.targets, self.keys = torch.from_numpy(x), torch.from_numpy(y), list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        return (x.float() / 255 if x.dtype == torch.uint8 else x), self.targets[i]


def val_digest(ds: Dataset[Any]) -> str | None:
    """SHA-256 (16 hex digits) of a split's rows, in order: their keys when the dataset names
    them (``keys``: the URI datasets; ``samples``: image files, relative to their root), else
    their contents (``x`` bytes then ``y`` bytes, row by row). Two runs whose val rows are the
    same have the same digest. None (and a warning) for rows it cannot read as ``(x, y)``
    tensors: a digest never fails the run that records it."""
    h = hashlib.sha256()
    base, idx = (ds.dataset, list(ds.indices)) if isinstance(ds, Subset) else (ds, None)
    keys = getattr(base, "keys", None)
    if keys is None and getattr(base, "samples", None) is not None:
        root = getattr(base, "root", None)
        keys = [os.path.relpath(p, root) if root else str(p) for p, _ in base.samples]
    if isinstance(keys, list):
        for k in keys if idx is None else (keys[i] for i in idx):
            h.update(str(k).encode() + b"\0")
        return h.hexdigest()[:16]
    rows = (ds[i] for i in range(len(ds))) if isinstance(ds, Sized) else iter(ds)
    try:
        for x, y in rows:
            h.update(torch.as_tensor(x).numpy().tobytes() + torch.as_tensor(y).numpy().tobytes())
    except Exception as e:  # a user dataset of other items: no digest, the run goes on
        log.warning("no val_digest: the val rows are not (x, y) tensors (%s)", e)
        return None
    return h.hexdigest()[:16]


def check_val_frac(val_frac: float) -> float:
    """Validate the held-out fraction: ``0 <= val_frac < 1``."""
    if not isinstance(val_frac, (int, float)) or not 0.0 <= float(val_frac) < 1.0:
        raise ValueError(f"val_frac must be in [0, 1), got {val_frac!r}")
    return float(val_frac)


def held_out_split(n: int, val_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into disjoint ``(train_idx, val_idx)`` by a seeded permutation.

    ``len(val_idx) == round(n * val_frac)``; both index tensors are int64 and sorted
    (so a split reads its storage in order). The permutation uses its own
    ``torch.Generator``: the global RNG is untouched.
    """
    val_frac = check_val_frac(val_frac)
    num_val = int(round(n * val_frac))
    if val_frac > 0 and num_val == 0 and n > 1:
        num_val = 1
    if num_val >= n and n > 0:
        raise ValueError(f"val_frac={val_frac} leaves no training examples out of {n}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    val_idx, _ = torch.sort(perm[:num_val])
    train_idx, _ = torch.sort(perm[num_val:])
    return train_idx, val_idx

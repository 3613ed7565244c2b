"""What Ray Data's read tasks run for a streamed training split (:mod:`twa_ray.data.stream`):
its plan (:class:`StreamedTrain`), the rule that gives each row its rank, and the
``map_batches`` function (:class:`ReadRows`) that reads a rank's rows.

This module and what it imports (:mod:`twa_ray.data.uri`, ``twa_ray.storage``) import no
torch: a read task is a process of its own that unpickles :class:`ReadRows` and imports this
module, and importing torch cost each one ~1 s of CPU (1.9 s against 1.2 s measured; six or
more read tasks per streamed run, on every node that runs a worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from twa_ray.data.uri import carve, key_unit, open_root, read_bytes, read_images, read_unit

__all__ = ["ReadRows", "StreamedTrain", "rank_of", "shard_salt"]


@dataclass(frozen=True)
class StreamedTrain:
    """The training split as the workers stream it (:mod:`twa_ray.data.stream`): ``len()`` is its
    number of rows; ``shard_u`` holds each row's ``u(seed/shard, key)`` (in key order). It is
    ``DataSplits.train`` but not a ``torch.utils.data.Dataset``: a read task must not import
    torch."""

    kind: str
    root: str
    opts: dict[str, Any]
    units: tuple[str, ...]  # the train split's read units, in key order
    classes: tuple[str, ...]  # images: the class folder names
    seed: int
    val_frac: float
    carved: tuple[bool, bool]  # (val, test) carved out of train
    cut: tuple[int, int] | None  # num_samples: the last kept (unit, row)
    shape: tuple[int, ...]  # one row's x
    shard_u: np.ndarray
    worker_decode: bool = False  # images: the read tasks pass the files' bytes (``raw``)

    def __len__(self) -> int:
        return len(self.shard_u)

    def __getitem__(self, i: int) -> Any:
        raise TypeError("the streamed training split is read through Ray Data, not by index")

    def rows_per_rank(self, world: int) -> np.ndarray:
        return np.bincount(rank_of(self.shard_u, world), minlength=world)

    def keep(self, keys: Sequence[str], pos: np.ndarray, rank: int, world: int) -> np.ndarray:
        """Which of these rows (keys, (unit, row) positions) are rank ``rank``'s training rows."""
        vf = self.val_frac
        train = ~carve(keys, self.seed, 0.0, vf) if self.carved[0] else np.ones(len(keys), bool)
        if self.carved[1]:
            train &= ~carve(keys, self.seed, vf, 2 * vf)
        if self.cut is not None:
            u, r = self.cut
            train &= (pos[:, 0] < u) | ((pos[:, 0] == u) & (pos[:, 1] <= r))
        return train & (rank_of(key_unit(keys, shard_salt(self.seed)), world) == rank)


def shard_salt(seed: int) -> str:
    """The salt of ``u(seed/shard, key)``, which picks a training row's rank."""
    return f"{seed}/shard"


def rank_of(u: np.ndarray, world: int) -> np.ndarray:
    """The rank ``floor(world * u)`` of rows with ``u(seed/shard, key) = u``."""
    return np.minimum((u * world).astype(np.int64), world - 1)


class ReadRows:
    """A Ray Data ``map_batches`` function: a batch of read units -> rank ``rank``'s training
    rows in them (``x`` float32, ``y`` int64)."""

    def __init__(self, train: StreamedTrain, rank: int, world: int) -> None:
        self.train, self.rank, self.world = train, rank, world

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = self.train
        fs, base = open_root(t.root)
        xs, ys = [], []
        first = [int(i) for i in batch["unit"]]
        if t.kind == "images":
            names = [t.units[i] for i in first]
            pos = np.array([(i, 0) for i in first]).reshape(-1, 2)
            keep = t.keep(names, pos, self.rank, self.world)
            chosen = [n for n, k in zip(names, keep) if k]
            y = np.array([t.classes.index(n.split("/")[-2]) for n in chosen], np.int64)
            if t.worker_decode:
                raw = np.array([read_bytes(fs, f"{base}/{n}") for n in chosen], dtype=object)
                return {"raw": raw, "name": np.array(chosen, dtype=object), "y": y}
            if chosen:
                xs.append(read_images(fs, base, t.root, chosen, t.classes).x / np.float32(255))
                ys.append(y)
        else:
            for i in first:
                rows = read_unit(t.kind, fs, base, t.root, t.opts, t.units[i])
                pos = np.stack([np.full(len(rows.keys), i), np.arange(len(rows.keys))], 1)
                keep = t.keep(rows.keys, pos, self.rank, self.world)
                xs.append(rows.x[keep].astype(np.float32))
                ys.append(rows.y[keep])
        if not xs:
            return {"x": np.zeros((0, *t.shape), np.float32), "y": np.zeros(0, np.int64)}
        return {"x": np.concatenate(xs), "y": np.concatenate(ys)}

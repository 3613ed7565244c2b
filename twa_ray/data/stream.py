"""The training split of a URI dataset streamed to the Ray Train workers by Ray Data
(``--ingest stream``; the default ``auto`` streams a ``--dataset parquet|images|hf_disk`` over
the in-memory path's 256 MiB).

The driver reads the dataset once, as before (the checks, the model's shapes, ``metrics.json``'s
``data``); the workers receive the val and test rows through the object store and read their
training rows themselves, every epoch, through Ray Data (``ray.train.get_dataset_shard``):

- Read: Ray Data tasks (:mod:`twa_ray.data.read_tasks`, torch-free) open ``--data-root`` with
  the pyarrow filesystem and credentials of :mod:`twa_ray.data.uri` and read one unit each (a
  parquet file, a hf_disk split, up to :data:`IMAGES_PER_TASK` image files); images are decoded
  and scaled to [0, 1] there, on Ray Data's CPUs, not in the training process. (Not
  ``read_parquet``: it does not give a row's index in its file, which is half of the row's key.)
- Rows: the training rows of the in-memory path, by the same rule: a row's key ``k``
  (:mod:`twa_ray.data.uri`) is carved to val when ``u(seed, k) < val_frac`` and to test when
  ``val_frac <= u < 2 val_frac`` (where the data gives no such split); ``num_samples`` keeps the
  rows up to the last kept one in key order (``cut``).
- Shards: a training row belongs to rank ``floor(world * u(seed/shard, k))``, a function of
  the seed and the number of workers alone, not of blocks, nodes or timing (Ray Train's default
  ``streaming_split`` hands blocks to whichever worker asks first). Rank r reads the dataset
  ``train_<r>``; every rank takes the smallest shard's number of batches per epoch.
- Order: blocks in unit order (``preserve_order``), then a local shuffle buffer seeded by
  ``(seed, epoch, rank)``: an epoch's batches are a function of ``(seed, epoch, rank, world)``,
  so a run restarted from an epoch's checkpoint (a lost worker, ``--resume``) replays the
  batches of an uninterrupted run.

The cost of that order: each rank's tasks read every parquet or Arrow file and keep their rank's
rows (image files are chosen by their path before they are read).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from twa_ray.data.read_tasks import ReadRows, StreamedTrain, shard_salt
from twa_ray.data.splits import DataSplits
from twa_ray.data.uri import (
    URI_DATASETS,
    decode_image,
    image_classes,
    key_unit,
    open_root,
    read_units,
)

if TYPE_CHECKING:
    from twa_ray.config import DataConfig

__all__ = ["IMAGES_PER_TASK", "StreamedTrain", "stream_splits", "train_datasets", "StreamLoader"]

IMAGES_PER_TASK = 64
"""Image files per Ray Data read task."""
SHUFFLE_ROWS = 4096
"""Rows in each worker's local shuffle buffer (at least one batch)."""
READ_CPUS = 0.0
"""CPUs a read task asks for: none, so that the reads run beside Train workers that hold every
CPU of a node (Ray Data still bounds their number)."""


def streams(data: DataConfig, *, large: bool) -> bool:
    """Whether ``data``'s training split is streamed by Ray Data: ``--ingest stream*``, or
    ``auto`` and a ``large`` dataset (one that does not fit the in-memory path's shipping)."""
    if data.dataset not in URI_DATASETS or data.ingest == "memory":
        return False
    return data.ingest != "auto" or large


def stream_splits(splits: DataSplits, data: DataConfig) -> DataSplits:
    """``splits`` (the driver's, read by :func:`~twa_ray.data.uri.load_uri_dataset`) with the
    training split replaced by its :class:`StreamedTrain`."""
    root = str(data.data_root)
    fs, base = open_root(root)
    units = read_units(data.dataset, fs, base, root)
    keys = list(splits.train.keys)  # type: ignore[attr-defined]
    names = units["train"]
    cut = None
    if data.num_samples is not None and keys:
        cut = _position(data.dataset, keys[-1], names)
    features = data.feature_columns.split(",") if data.feature_columns else None
    train = StreamedTrain(
        kind=data.dataset,
        root=root,
        opts={"features": features, "label": data.label_column},
        units=tuple(names),
        classes=tuple(image_classes(names)) if data.dataset == "images" else (),
        seed=data.seed,
        val_frac=data.val_frac,
        carved=("val" not in units, "test" not in units),
        cut=cut,
        shape=splits.input_shape,
        shard_u=key_unit(keys, shard_salt(data.seed)),
        worker_decode=data.dataset == "images" and data.ingest == "stream_worker_decode",
    )
    return DataSplits(train, splits.val, splits.test, splits.num_classes, splits.input_shape)


def _position(kind: str, key: str, units: Sequence[str]) -> tuple[int, int]:
    """A row key's (unit, row) position in key order."""
    if kind == "images":
        return units.index(key), 0
    unit, _, row = key.rpartition("#")
    return (0 if kind == "hf_disk" else units.index(unit)), int(row)


# --------------------------------------------------------------------------- Ray Data


def train_datasets(train: StreamedTrain, world: int) -> dict[str, Any]:
    """``{"train_<r>": rank r's training rows}`` as Ray Datasets (read lazily, by the worker
    that iterates them)."""
    import ray.data

    per_task = IMAGES_PER_TASK if train.kind == "images" else 1
    out = {}
    for rank in range(world):
        units = ray.data.from_items(
            [{"unit": i} for i in range(len(train.units))],
            override_num_blocks=max(1, -(-len(train.units) // per_task)),
        )
        ds = units.map_batches(
            ReadRows(train, rank, world), batch_size=per_task, num_cpus=READ_CPUS
        )
        # the workers' logs stay one line per epoch (no progress bars, no execution plans)
        ds.context.enable_progress_bars = False
        ds.context.print_on_execution_start = False
        out[f"train_{rank}"] = ds
    return out


def ingest_options() -> Any:
    """Ray Data's execution options of the streamed datasets: Ray Train's defaults, blocks in
    order (the epoch's batches are reproducible)."""
    import warnings

    import ray.train

    with warnings.catch_warnings():  # Ray's own default: exclude_resources is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def dataset_config() -> Any:
    """Ray Train's ``DataConfig`` of the streamed datasets: none split (each rank reads its own
    ``train_<r>``), :func:`ingest_options`."""
    import ray.train

    return ray.train.DataConfig(datasets_to_split=[], execution_options=ingest_options())


class StreamLoader:
    """This rank's training batches of an epoch, streamed: ``set_epoch`` then iterate; every
    rank yields ``len()`` batches of ``batch_size`` rows (the smallest shard's number)."""

    def __init__(
        self, train: StreamedTrain, shard: Any, rank: int, world: int, batch_size: int, seed: int
    ) -> None:
        self.shard = shard  # rank's DataIterator: ray.train.get_dataset_shard(f"train_{rank}")
        self.root = train.root
        self.rank, self.batch_size, self.seed = rank, batch_size, seed
        self.steps = int(train.rows_per_rank(world).min()) // batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = hashlib.blake2b(f"{self.seed}\0{self.epoch}\0{self.rank}".encode(), digest_size=4)
        batches = self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=max(SHUFFLE_ROWS, self.batch_size),
            local_shuffle_seed=int.from_bytes(seed.digest(), "big"),
            drop_last=True,
        )
        for _, b in zip(range(self.steps), batches):
            if "raw" in b:  # stream_worker_decode: the image files decoded here
                images = [decode_image(r, n, self.root) for r, n in zip(b["raw"], b["name"])]
                b["x"] = np.stack(images) / np.float32(255)
            x, y = (np.require(b[k], dt, ["W"]) for k, dt in (("x", np.float32), ("y", np.int64)))
            yield torch.from_numpy(x), torch.from_numpy(y)

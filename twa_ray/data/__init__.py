"""Datasets: train / held-out val / test splits for the sampling, TWA and report phases.

- ``"mnist1d"``: MNIST-1D generated locally by the ``mnist1d`` package (never downloaded),
  the CPU-scale test bed of bench/claims.py (bench/RESULTS.md);
- ``"cifar10"``, ``"cifar100"``: the official binary or python files under a local root
  (python pickles are read with a numpy-only unpickler);
- ``"imagefolder"``: ``root/train`` + ``root/val`` and/or ``root/test`` class folders;
- ``"parquet"``, ``"images"``, ``"hf_disk"``: read from a folder or any storage URI
  (:mod:`twa_ray.data.uri`);
- ``"pkg.module:function"``: a user function (see :func:`splits_from_user`).

Every name is imported on first use: Ray Data's read tasks import :mod:`twa_ray.data.read_tasks`,
which must not import torch on the way.

>>> from twa_ray.data import load_dataset
>>> splits = load_dataset("mnist1d", val_frac=0.1, seed=0)  # doctest: +SKIP
"""

from twa_ray.lazy import exports

_WHERE = {
    "DATASETS": "twa_ray.data.registry",
    "DataSplits": "twa_ray.data.splits",
    "held_out_split": "twa_ray.data.splits",
    "load_data": "twa_ray.data.registry",
    "load_dataset": "twa_ray.data.registry",
    "splits_from_user": "twa_ray.data.registry",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = exports(__name__, _WHERE)

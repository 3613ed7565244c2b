"""Datasets: train / held-out val / test splits for the sampling, TWA and report phases.

- ``"mnist1d"``: MNIST-1D generated locally by the ``mnist1d`` package (never downloaded),
  the CPU-scale test bed of bench/claims.py (bench/RESULTS.md);
- ``"cifar10"``, ``"cifar100"``: the official binary or python files under a local root
  (python pickles are read with a numpy-only unpickler);
- ``"imagefolder"``: ``root/train`` + ``root/val`` and/or ``root/test`` class folders;
- ``"parquet"``, ``"images"``, ``"hf_disk"``: read from a folder or any storage URI
  (:mod:`twa_ray.data.uri`);
- ``"pkg.module:function"``: a user function (see :func:`splits_from_user`).

>>> from twa_ray.data import load_dataset
>>> splits = load_dataset("mnist1d", val_frac=0.1, seed=0)  # doctest: +SKIP
"""

from twa_ray.data.registry import DATASETS, load_data, load_dataset, splits_from_user
from twa_ray.data.splits import DataSplits, held_out_split

__all__ = [
    "DATASETS",
    "DataSplits",
    "held_out_split",
    "load_data",
    "load_dataset",
    "splits_from_user",
]

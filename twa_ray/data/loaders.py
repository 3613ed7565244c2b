"""Data loaders over a split, shared by every command (the driver's baselines, ``average``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["make_loader"]


def make_loader(
    ds: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int = 0, pin_memory: bool = False
) -> DataLoader[Any]:
    """``pin_memory``: page-locked batches, so that copies to a GPU overlap compute."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen if shuffle else None,
        pin_memory=pin_memory,
    )

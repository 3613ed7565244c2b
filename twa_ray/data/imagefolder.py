"""Image classification from class-per-folder directories (``torchvision.datasets.ImageFolder``).

Layout under ``root``::

    root/train/<class>/*.png|jpg|...      always
    root/val/<class>/...                  optional
    root/test/<class>/...                 optional

- ``train`` + ``val`` + ``test``: used as they are.
- ``train`` + one of ``val`` / ``test`` (the usual ImageNet layout): that folder is the
  **test** split, and ``val_frac`` of ``train`` is held out as ``val`` (TWA-v must learn
  on data that neither sampling nor reporting uses).

Class indices come from the sorted class folders of ``train``; the other splits reuse
that mapping (a class missing there is fine, a class unknown to ``train`` is an error).
Images are resized/cropped to ``image_size`` and normalized with the ImageNet statistics.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from twa_ray.data.splits import DataSplits, held_out_split

__all__ = ["IMAGENET_MEAN_STD", "image_transforms", "load_imagefolder"]

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _to_int64(y: int) -> torch.Tensor:
    return torch.tensor(y, dtype=torch.int64)


def _load_image(path: str) -> Any:
    """torchvision's PIL loader; a file that is not a readable image is one ``ValueError``."""
    from torchvision.datasets.folder import pil_loader

    try:
        return pil_loader(path)
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise ValueError(
            f"{path} is not a readable image ({type(e).__name__}); remove or replace it in the "
            "--data-root folder"
        ) from None


class _ImageFolder(ImageFolder):
    """ImageFolder whose class -> index mapping can be fixed (taken from the train folder)."""

    def __init__(self, root: Path, *, classes: list[str] | None = None, **kwargs: Any):
        self._fixed_classes = classes
        super().__init__(
            root,
            target_transform=_to_int64,
            allow_empty=classes is not None,
            loader=_load_image,
            **kwargs,
        )

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        found, mapping = super().find_classes(directory)
        if self._fixed_classes is None:
            return found, mapping
        unknown = sorted(set(found) - set(self._fixed_classes))
        if unknown:
            raise ValueError(
                f"{directory}: class folders {unknown} do not exist in the train folder; every "
                "split must use the train split's classes"
            )
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}


def image_transforms(image_size: int = 224, *, train: bool) -> v2.Compose:
    """ImageNet-style transforms: RandomResizedCrop + flip (train) or Resize + CenterCrop (eval)."""
    mean, std = IMAGENET_MEAN_STD
    if train:
        geometry: list[Any] = [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        # the 224/256 ratio of the ImageNet evaluation protocol
        geometry = [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )


def load_imagefolder(
    *,
    root: str | os.PathLike[str] | None,
    val_frac: float = 0.1,
    seed: int = 0,
    num_samples: int | None = None,
    image_size: int = 224,
    augment: bool = True,
) -> DataSplits:
    """Class-folder image data as :class:`DataSplits` (see the module docstring for the layout).

    Args:
        root: directory holding ``train/`` and ``val/`` and/or ``test/``.
        val_frac: fraction of ``train`` held out as ``val`` when ``root`` has no separate
            validation folder (seeded permutation).
        seed: seed of that permutation.
        num_samples: if given, keep a seeded random subset of this many training images
            (before the val split) — for smoke tests.
        image_size: side of the square crops (default 224).
        augment: RandomResizedCrop + flip on the train split (val/test: resize + center crop).
    """
    if root is None:
        raise FileNotFoundError("imagefolder: pass root=<directory with train/ and val/ or test/>")
    if image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    root_path = Path(root).expanduser()
    train_dir = root_path / "train"
    held = [d for d in (root_path / "val", root_path / "test") if d.is_dir()]
    if not train_dir.is_dir() or not held:
        raise FileNotFoundError(
            f"imagefolder: expected {train_dir}/<class>/<image> and {root_path / 'val'}/<class>/... "
            f"and/or {root_path / 'test'}/<class>/...; found "
            f"{sorted(p.name for p in root_path.iterdir()) if root_path.is_dir() else 'no directory'}"
        )

    eval_tf = image_transforms(image_size, train=False)
    train_all = _ImageFolder(train_dir, transform=eval_tf)
    classes = list(train_all.classes)
    train_aug = copy.copy(train_all)  # same file list, its own transform
    if augment:
        train_aug.transform = image_transforms(image_size, train=True)

    n = len(train_all)
    pool = torch.arange(n)
    if num_samples is not None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples!r}")
        gen = torch.Generator().manual_seed(int(seed) + 1)  # independent of the val permutation
        pool, _ = torch.sort(torch.randperm(n, generator=gen)[: min(num_samples, n)])

    test: Dataset[Any]
    val: Dataset[Any]
    if len(held) == 2:  # train, val and test folders: use them as they are
        train: Dataset[Any] = Subset(train_aug, pool.tolist())
        val = _ImageFolder(held[0], classes=classes, transform=eval_tf)
        test = _ImageFolder(held[1], classes=classes, transform=eval_tf)
    else:  # one held-out folder: it is the test split, val comes out of train
        train_pos, val_pos = held_out_split(len(pool), val_frac, seed)
        train = Subset(train_aug, pool[train_pos].tolist())
        val = Subset(train_all, pool[val_pos].tolist())
        test = _ImageFolder(held[0], classes=classes, transform=eval_tf)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
    )

"""Typed configuration of each stage: one frozen dataclass per stage, defaults only here.

YAML files and CLI flags map onto these dataclasses (:func:`load_config`); every output directory
gets the resolved config next to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from twa_ray.core.twa import TWAConfig

__all__ = ["DataConfig", "SamplingConfig", "RunConfig", "load_config", "config_from_dict"]


def _check(errors: list[str], what: str) -> None:
    if errors:
        raise ValueError(f"invalid {what}: " + "; ".join(errors))


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Dataset and model."""

    dataset: str = "mnist1d"
    """'mnist1d' (generated), 'cifar10', 'cifar100', 'imagefolder', or 'pkg.module:function'."""
    data_root: str | None = None
    """Local root of CIFAR / ImageFolder files (never downloaded)."""
    model: str = "mlp"
    """'mlp', 'cnn1d', 'resnet20', 'vgg16_bn', 'tv:<torchvision name>', or 'pkg.module:function'."""
    val_frac: float = 0.1
    """Fraction of the training split held out for validation (never trained on)."""
    num_samples: int | None = None
    """MNIST-1D: total generated samples (None: the package default)."""
    seed: int = 0
    """Seed of the data split, model init and data order."""

    def __post_init__(self) -> None:
        errors = []
        if not 0 < self.val_frac < 1:
            errors.append(f"val_frac={self.val_frac}: must lie in (0, 1)")
        if self.num_samples is not None and self.num_samples < 100:
            errors.append(f"num_samples={self.num_samples}: use at least 100")
        _check(errors, "data config")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """The sampling phase: data-parallel SGD on the full-budget schedule, snapshotting candidates."""

    epochs: int = 40
    """Full epoch budget E: the learning-rate schedule spans E epochs."""
    sample_frac: float = 0.5
    """Train only the first sample_frac * E epochs (the saving); candidates come from these."""
    sample_interval: int = 1
    """Snapshot every this many epochs (interval_unit='epoch') or steps ('step')."""
    interval_unit: Literal["epoch", "step"] = "epoch"
    """Unit of sample_interval."""
    batch_size: int = 128
    """Global batch size (split across workers)."""
    lr: float = 0.1
    """Peak SGD learning rate (scaled for the global batch)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    schedule: Literal["cosine", "linear", "step", "constant"] = "cosine"
    """Learning-rate schedule over the full budget E."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs."""
    num_workers: int = 2
    """Ray Train workers."""
    use_gpu: bool = False
    """One GPU per worker (nccl) instead of CPU (gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Train worker (fractions allowed: 0.5 fits 2 workers + a Tune trial on 2 CPUs)."""
    max_failures: int = 1
    """Worker failures tolerated: the run restarts from the last Ray Train checkpoint."""

    def __post_init__(self) -> None:
        errors = []
        if self.epochs < 1:
            errors.append(f"epochs={self.epochs}: must be >= 1")
        if not 0 < self.sample_frac <= 1:
            errors.append(f"sample_frac={self.sample_frac}: must lie in (0, 1]")
        if self.sample_interval < 1:
            errors.append(f"sample_interval={self.sample_interval}: must be >= 1")
        if self.interval_unit not in ("epoch", "step"):
            errors.append(f"interval_unit={self.interval_unit!r}: use 'epoch' or 'step'")
        if self.batch_size < 1:
            errors.append(f"batch_size={self.batch_size}: must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            errors.append(f"lr={self.lr}: must be a positive number")
        if not 0 <= self.momentum < 1:
            errors.append(f"momentum={self.momentum}: must lie in [0, 1)")
        if self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay}: must be >= 0")
        if self.num_workers < 1:
            errors.append(f"num_workers={self.num_workers}: must be >= 1")
        if self.cpus_per_worker <= 0:
            errors.append(f"cpus_per_worker={self.cpus_per_worker}: must be > 0")
        if self.max_failures < 0:
            errors.append(f"max_failures={self.max_failures}: must be >= 0")
        if self.warmup_epochs < 0:
            errors.append(f"warmup_epochs={self.warmup_epochs}: must be >= 0")
        _check(errors, "sampling config")

    @property
    def sample_epochs(self) -> int:
        """Epochs actually trained: ceil(sample_frac * E), at least 1."""
        return max(1, math.ceil(self.sample_frac * self.epochs - 1e-9))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One end-to-end run: sample -> subspace -> TWA-t / TWA-v -> baselines -> report."""

    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    twa: TWAConfig = field(default_factory=TWAConfig)
    mode: Literal["t", "v", "both"] = "both"
    """TWA-t (train data), TWA-v (held-out validation data) or both."""
    compare_full: bool = False
    """Also train the full budget E for comparison."""
    greedy_soup: bool = True
    """Compute the greedy-soup baseline (2K evaluations)."""
    out: str = "runs/twa"
    """Output directory (local path)."""
    store: str | None = None
    """Candidate store URI (default: <out>/candidates)."""

    def __post_init__(self) -> None:
        if self.mode not in ("t", "v", "both"):
            raise ValueError(f"invalid run config: mode={self.mode!r}: use 't', 'v' or 'both'")

    @property
    def store_uri(self) -> str:
        return self.store or f"{self.out.rstrip('/')}/candidates"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {"data": DataConfig, "sampling": SamplingConfig, "twa": TWAConfig}


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts (``{"data": {...}, "sampling": {...},
    "twa": {...}, "mode": ...}``), reporting unknown keys by name."""
    top = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(d) - top)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known: {sorted(top)}")
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in _SECTIONS:
            cls = _SECTIONS[key]
            names = {f.name for f in fields(cls)}
            bad = sorted(set(value or {}) - names)
            if bad:
                raise ValueError(f"unknown option(s) {bad} in '{key}'; known: {sorted(names)}")
            kwargs[key] = cls(**(value or {}))
        else:
            kwargs[key] = value
    return RunConfig(**kwargs)


def load_config(path: str) -> RunConfig:
    """Read a YAML config file into a :class:`RunConfig`."""
    import yaml

    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} does not exist; check the path") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of sections")
    return config_from_dict(d)

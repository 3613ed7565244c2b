"""The TWA engine in pure torch (no Ray): layout, subspace, low-bit projection, optimizer, BN."""

from twa_ray.core.baselines import greedy_soup, uniform_average
from twa_ray.core.bn import update_bn
from twa_ray.core.evaluate import EvalResult, evaluate
from twa_ray.core.layout import Blocks, Layout, flatten, load_flat_, unflatten
from twa_ray.core.loop import CoefficientLoop, CoeffState, ShuffledBatches, steps_per_epoch
from twa_ray.core.subspace import Subspace, build_affine, build_span
from twa_ray.core.twa import TWA, TWAConfig, build_subspace

__all__ = [
    "TWA",
    "TWAConfig",
    "Blocks",
    "CoeffState",
    "CoefficientLoop",
    "ShuffledBatches",
    "EvalResult",
    "Layout",
    "Subspace",
    "build_affine",
    "build_span",
    "build_subspace",
    "evaluate",
    "flatten",
    "greedy_soup",
    "load_flat_",
    "steps_per_epoch",
    "unflatten",
    "uniform_average",
    "update_bn",
]

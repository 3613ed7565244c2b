"""The TWA engine in pure torch (no Ray): layout, subspace, low-bit projection, optimizer, BN."""

from twa_ray.core.baselines import greedy_soup, uniform_average
from twa_ray.core.bn import reestimate_bn, update_bn
from twa_ray.core.evaluate import EvalResult, evaluate, evaluate_sharded
from twa_ray.core.host import build_loop, standard_evaluation
from twa_ray.core.layout import Blocks, Layout, flatten, load_flat_, unflatten
from twa_ray.core.loop import (
    CoefficientLoop,
    CoeffState,
    LoopHooks,
    ShuffledBatches,
    steps_per_epoch,
)
from twa_ray.core.subspace import Subspace, build_affine, build_span
from twa_ray.core.twa import TWA, TWAConfig, build_subspace

__all__ = [
    "TWA",
    "TWAConfig",
    "Blocks",
    "CoeffState",
    "CoefficientLoop",
    "LoopHooks",
    "ShuffledBatches",
    "EvalResult",
    "Layout",
    "Subspace",
    "build_affine",
    "build_loop",
    "build_span",
    "build_subspace",
    "evaluate",
    "evaluate_sharded",
    "flatten",
    "greedy_soup",
    "load_flat_",
    "reestimate_bn",
    "standard_evaluation",
    "steps_per_epoch",
    "unflatten",
    "uniform_average",
    "update_bn",
]

"""The TWA engine in pure torch (no Ray): layout, subspace, low-bit projection, optimizer, BN.

Every name is imported on first use: ``twa_ray.core.atomic`` (the atomic writes that storage and
the CLI use) imports no torch, so neither do the processes that need only it (Ray Data's read
tasks: :mod:`twa_ray.data.read_tasks`).
"""

from twa_ray.lazy import exports

_WHERE = {
    "TWA": "twa_ray.core.twa",
    "TWAConfig": "twa_ray.core.twa",
    "Blocks": "twa_ray.core.layout",
    "CoeffState": "twa_ray.core.loop",
    "CoefficientLoop": "twa_ray.core.loop",
    "LoopHooks": "twa_ray.core.loop",
    "ShuffledBatches": "twa_ray.core.loop",
    "EvalResult": "twa_ray.core.evaluate",
    "Layout": "twa_ray.core.layout",
    "Subspace": "twa_ray.core.subspace",
    "build_affine": "twa_ray.core.subspace",
    "build_loop": "twa_ray.core.host",
    "build_span": "twa_ray.core.subspace",
    "build_subspace": "twa_ray.core.twa",
    "evaluate": "twa_ray.core.evaluate",
    "evaluate_sharded": "twa_ray.core.evaluate",
    "flatten": "twa_ray.core.layout",
    "greedy_soup": "twa_ray.core.baselines",
    "load_flat_": "twa_ray.core.layout",
    "reestimate_bn": "twa_ray.core.bn",
    "standard_evaluation": "twa_ray.core.host",
    "steps_per_epoch": "twa_ray.core.loop",
    "unflatten": "twa_ray.core.layout",
    "uniform_average": "twa_ray.core.baselines",
    "update_bn": "twa_ray.core.bn",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = exports(__name__, _WHERE)

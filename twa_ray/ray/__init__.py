"""The distributed shell around ``twa_ray.core``: Ray Train sampling, candidate snapshots,
projection shards and the coefficient worker group.

Nothing is imported here eagerly (importing Ray is slow); import the submodules:

>>> from twa_ray.ray.sampling import run_sampling       # doctest: +SKIP
>>> from twa_ray.ray.snapshot import Snapshotter        # doctest: +SKIP
"""

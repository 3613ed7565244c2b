"""The distributed shell around ``twa_ray.core``: Ray Train sampling, projection shards and the
coefficient phase, run alone or in one worker group per ``twa-ray run`` (:mod:`.run_loop`;
candidate snapshots: :mod:`twa_ray.store.snapshots`).

Nothing is imported here eagerly (importing Ray is slow); import the submodules:

>>> from twa_ray.ray.sampling import run_sampling       # doctest: +SKIP
>>> from twa_ray.ray.coeff_group import run_twa          # doctest: +SKIP
>>> from twa_ray.ray.run_loop import run_path           # doctest: +SKIP
"""

"""twa_ray: Trainable Weight Averaging on Ray.

The public API (everything else is internal and may change):

- :class:`TWA`, :class:`TWAConfig`: the engine, pure torch (``twa_ray.core.twa``);
- :func:`snapshot`, :class:`Snapshotter`: candidates while any loop trains (Ray Train or not);
- :func:`learn`: the learned average of a store's candidates, loaded into a model;
- :class:`CandidateStore`, :func:`import_checkpoints`: the candidates (any ``pyarrow.fs`` URI);
- the callbacks, each in its own module (extras ``lightning`` / ``hf``):
  ``twa_ray.integrations.lightning.TWACallback`` and ``twa_ray.integrations.hf.TWACallback``;
- the commands ``twa-ray run | sweep | average | import``.

Every name is imported on first use, so ``import twa_ray`` imports neither torch nor Ray.
"""

from twa_ray.lazy import exports

__version__ = "0.1.0"

_WHERE = {
    "TWA": "twa_ray.core.twa",
    "TWAConfig": "twa_ray.core.twa",
    "snapshot": "twa_ray.store.snapshots",
    "Snapshotter": "twa_ray.store.snapshots",
    "learn": "twa_ray.train",
    "CandidateStore": "twa_ray.store.store",
    "import_checkpoints": "twa_ray.store.importers",
}

__all__ = [
    "CandidateStore",
    "Snapshotter",
    "TWA",
    "TWAConfig",
    "__version__",
    "import_checkpoints",
    "learn",
    "snapshot",
]

__getattr__, __dir__ = exports(__name__, _WHERE)

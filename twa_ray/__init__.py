"""twa_ray: Trainable Weight Averaging on Ray.

The engine (``twa_ray.core``) is pure torch; the Ray layer (``twa_ray.ray``) is imported only by
the pipeline and the CLI, so ``import twa_ray`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["TWA", "TWAConfig", "__version__"]


def __getattr__(name: str):  # lazy: importing twa_ray must not import torch eagerly
    if name in ("TWA", "TWAConfig"):
        from twa_ray.core import twa

        return getattr(twa, name)
    raise AttributeError(name)

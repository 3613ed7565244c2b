"""Optional dependencies (the ``lightning`` and ``hf`` extras): one clear error when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or one ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module} is not installed; install the extra: pip install 'twa_ray[{extra}]'"
        ) from None

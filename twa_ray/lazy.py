"""Package names imported on first use (PEP 562): ``import twa_ray``, ``twa_ray.core`` and
``twa_ray.data`` import no torch until a name that needs it is used.

>>> __getattr__, __dir__ = exports(__name__, {"TWA": "twa_ray.core.twa"})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["exports"]


def exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module-level ``__getattr__`` and ``__dir__``: name -> ``where[name]``'s
    attribute of that name, imported when first asked for."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__

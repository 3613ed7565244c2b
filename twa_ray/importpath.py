"""Resolve ``"pkg.module:function"`` import paths to callables.

Datasets, models and other plug-in points accept either a built-in name
(``"mnist1d"``, ``"resnet20"``) or an import path to a user function, written
``"package.module:attribute"`` (the attribute may be dotted:
``"pkg.mod:Factory.build"``). The module is imported with :func:`importlib.import_module`,
so it must be importable from the process that resolves it (installed, or on
``PYTHONPATH``; with ``ray job submit --working-dir .`` the working directory is).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ImportPathError", "call_with_accepted", "is_import_path", "load_callable"]


class ImportPathError(ValueError):
    """An import path is malformed, or names a module/attribute that is missing or not callable."""


def is_import_path(spec: str) -> bool:
    """True when ``spec`` looks like ``"pkg.module:function"`` rather than a built-in name."""
    return ":" in spec and not spec.startswith(":")


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``"pkg.module:attr[.attr...]"`` and return the callable it names.

    Args:
        spec: ``"module.path:attribute"``; the attribute may be dotted (``"mod:Cls.method"``).

    Returns:
        The callable object.

    Raises:
        ImportPathError: (a ``ValueError``) the spec is malformed, the module cannot be
            found, the attribute does not exist, or it is not callable. An import error
            raised *inside* the user's module (one of its own dependencies is missing)
            is not masked: it propagates unchanged, since that is a bug to see in full.

    >>> load_callable("math:sqrt")(4.0)
    2.0
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ImportPathError(
            f"import path {spec!r} must look like 'package.module:function' (exactly one ':')"
        )
    module_name, _, attr_path = spec.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not module_name or not attr_path:
        raise ImportPathError(
            f"import path {spec!r} must look like 'package.module:function' "
            "(both the module and the attribute are required)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only report "not found" when it is the module we were asked for (or one of its
        # parent packages); a missing dependency of the user's module is their bug.
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ImportPathError(
                f"cannot import module {module_name!r} of import path {spec!r}: no module named "
                f"{e.name!r}; install it or put its directory on PYTHONPATH "
                "(with `ray job submit`, pass --working-dir or a runtime_env with py_modules)"
            ) from e
        raise
    obj: Any = module
    parts = attr_path.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            owner = (
                f"module {module_name!r}"
                if i == 0
                else repr(f"{module_name}:{'.'.join(parts[:i])}")
            )
            raise ImportPathError(
                f"import path {spec!r}: {owner} has no attribute {part!r}" + _suggest(obj)
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ImportPathError(
            f"import path {spec!r} names a {type(obj).__name__}, not a callable; "
            "point it at a function or class"
        )
    return obj


def _suggest(obj: Any) -> str:
    public = sorted(
        n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))
    )
    if not public:
        return ""
    shown = ", ".join(public[:20]) + (", ..." if len(public) > 20 else "")
    return f" (callables there: {shown})"


def call_with_accepted(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """Call ``fn`` with those of ``kwargs`` that its signature accepts.

    A function taking ``**kwargs`` gets all of them; one taking none of the names is
    called with no arguments. Used for user factories such as
    ``make_model(num_classes, input_shape)`` or ``make_model()``.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        return fn(**kwargs)
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(**kwargs)
    accepted = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})

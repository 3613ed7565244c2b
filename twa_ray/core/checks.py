"""Bounds and choices declared on the fields of a config dataclass, checked in one place.

A field's type says what it accepts: ``Literal[...]`` its choices, ``Annotated[float,
Range(gt=0, le=1)]`` its interval, ``int`` a 64-bit integer. :func:`check_fields`, called from
``__post_init__``, reports every field outside its type at once, as one :class:`ConfigError`
line; pure Python, so the core's own configs use it too.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class C:
...     lr: Annotated[float, Range(gt=0, lt=math.inf)] = 0.1
...     def __post_init__(self):
...         check_fields(self, "example config")
>>> C(lr=0.0)
Traceback (most recent call last):
...
twa_ray.core.checks.ConfigError: invalid example config: lr=0.0: must be a positive number
"""

from __future__ import annotations

import functools
import math
import operator
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

import torch

__all__ = [
    "INT64_MAX",
    "ConfigError",
    "FiniteWatch",
    "NonFiniteError",
    "Range",
    "check_coefficient_step",
    "check_fields",
    "check_loss",
    "unwrap",
]

INT64_MAX = 2**63 - 1
"""Integers of a config are stored and seeded as 64-bit integers."""


class ConfigError(ValueError):
    """Config values out of range: ``(field, value, rule)`` triples (field None: a whole
    sentence in ``rule``), shown as one line; :func:`twa_ray.config.config_from_dict` adds the flag or key."""

    def __init__(self, what: str, problems: list[tuple[str | None, Any, str]]) -> None:
        super().__init__(what, problems)  # the arguments: it pickles
        self.what, self.problems = what, problems

    def __str__(self) -> str:
        return self.render()

    def render(self, prefix: str = "", flags: Mapping[str, str] | None = None) -> str:
        """The one line; ``prefix + field`` looked up in ``flags`` names the flag it came from."""
        parts = []
        for name, value, rule in self.problems:
            flag = (flags or {}).get(prefix + name) if name else None
            parts.append(
                rule if name is None else f"{name}={value!r}{f' ({flag})' if flag else ''}: {rule}"
            )
        return f"invalid {self.what}: " + "; ".join(parts)


@dataclass(frozen=True)
class Range:
    """The bounds of a numeric field, declared on its type (``Annotated[float, Range(gt=0, le=1)]``)
    and checked by :func:`check_fields` in ``__post_init__`` (pydantic does not read it, so that a
    config's problems are all reported at once, on the converted values). An upper bound of
    ``inf`` (``lt=math.inf``) only asks for a finite number."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None


_BOUNDS = (("gt", operator.gt, "(", ">"), ("ge", operator.ge, "[", ">="))
_UPPER = (("lt", operator.lt, ")", "<"), ("le", operator.le, "]", "<="))


def _rule(iv: Range) -> str:
    """A :class:`Range` in words: ``must lie in (0, 1]``, ``must be >= 1``, ``must be a positive
    number``."""
    lo = next(
        ((b, sym, cmp) for k, _, b, cmp in _BOUNDS if (sym := getattr(iv, k)) is not None), None
    )
    hi = next(
        ((b, sym, cmp) for k, _, b, cmp in _UPPER if (sym := getattr(iv, k)) is not None), None
    )
    if hi is not None and math.isinf(hi[1]):
        if lo == ("(", 0, ">"):
            return "must be a positive number"
        return f"must be a finite number {lo[2]} {lo[1]}" if lo else "must be a finite number"
    if lo and hi:
        return f"must lie in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    bound = lo or hi
    assert bound is not None
    return f"must be {bound[2]} {bound[1]}"


def _inside(value: float, iv: Range) -> bool:
    """``value`` within ``iv`` (NaN never is)."""
    return all(
        getattr(iv, k) is None or op(value, getattr(iv, k)) for k, op, _, _ in _BOUNDS + _UPPER
    )


def unwrap(hint: Any) -> tuple[Any, list[Any]]:
    """(type, Annotated metadata) of a field's hint, ``X | None`` read as ``X``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return base, meta
    return hint, []


def _field_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` is outside what ``hint`` declares (a ``Literal``'s choices, an
    :class:`~annotated_types.Range`, a 64-bit integer), or None."""
    base, meta = unwrap(hint)
    if value is None:
        return None
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        return None if value in choices else "use one of " + ", ".join(map(repr, choices))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # a type error: pydantic names it (the Python API trusts its caller's types)
    for iv in (m for m in meta if isinstance(m, Range)):
        if not _inside(value, iv):
            return _rule(iv)
    if base is int and not -INT64_MAX - 1 <= value <= INT64_MAX:
        return f"must fit in 64 bits (at most {INT64_MAX})"
    return None


def check_fields(obj: Any, what: str, extra: list[str] | None = None) -> None:
    """Check every field of the config dataclass ``obj`` against its declared type (raised as
    one :class:`ConfigError` with ``extra`` problems, sentences of the caller's own)."""
    cls: type = type(obj)
    hints = _hints(cls)
    problems: list[tuple[str | None, Any, str]] = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        problem = _field_problem(value, hints[f.name])
        if problem:
            problems.append((f.name, value, problem))
    problems += [(None, None, e) for e in extra or []]
    if problems:
        raise ConfigError(what, problems)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


# --------------------------------------------------------------------------- divergence


class NonFiniteError(FloatingPointError):
    """Training diverged: a loss, gradient or coefficient is NaN or infinite. A configuration
    problem (the learning rate): a retry diverges again."""


class FiniteWatch:
    """The first step whose loss or gradient is not finite, kept on the device.

    :meth:`update_` costs no host synchronisation (``torch.where`` on a device scalar); the
    host reads the flag with :meth:`first` where it waits anyway (every step on the CPU, before
    a snapshot, at an epoch end). After DDP's all-reduce the gradient is the same on every
    rank, so every rank sees the same first step::

        bad_t = not isfinite(sum |loss| + sum |g|)
    """

    def __init__(self, device: torch.device) -> None:
        self._first = torch.full((), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update_(self, step: int, loss: torch.Tensor, grads: Iterable[torch.Tensor]) -> None:
        """Record ``step`` if it is the first with a non-finite ``loss`` or gradient."""
        grads = list(grads)
        total = loss.detach().float().abs().sum()
        if grads:
            total = total + torch.nn.utils.get_total_norm(grads, norm_type=1.0)
        bad = ~torch.isfinite(total) & (self._first < 0)
        self._first = torch.where(bad, torch.full_like(self._first, step), self._first)

    def first(self) -> int | None:
        """The first non-finite step so far (one read of a device scalar), or None."""
        step = int(self._first)
        return None if step < 0 else step


def check_coefficient_step(
    a: torch.Tensor, alpha: torch.Tensor, loss: float, *, step: int, epoch: float, lr: float
) -> None:
    """After a coefficient step: raise :class:`NonFiniteError` when the averaged projected
    gradient ``a``, the coefficients ``alpha`` or this worker's mean ``loss`` is not finite
    (``a`` and ``alpha`` are the same on every worker: every rank stops at the same step)."""
    if math.isfinite(loss) and bool(torch.isfinite(a.sum() + alpha.sum())):
        return
    raise NonFiniteError(
        f"TWA diverged at epoch {epoch:.2f}, step {step} (lr {lr:.4g}): the loss or the "
        f"coefficients hold NaN/Inf (loss {loss:.4g}); lower the TWA learning rate (--twa-lr)"
    )


def check_loss(loss: torch.Tensor) -> None:
    """A loss to step on is one number: a ``ValueError`` naming its shape otherwise (a loss
    left unreduced would backpropagate nothing meaningful, or fail deep inside autograd)."""
    if loss.dim() != 0:
        raise ValueError(
            f"the loss function returned a tensor of shape {tuple(loss.shape)}, not a scalar: "
            "make loss_fn reduce it to one number (e.g. reduction='mean')"
        )

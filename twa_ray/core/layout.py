"""Parameter layout: flatten a model's trainable parameters into one vector and back.

A :class:`Layout` records the names, shapes and dtypes of the trainable parameters
in ``named_parameters()`` order (frozen parameters and buffers excluded). Every flat
vector in twa_ray travels with its layout; the layout's ``fingerprint`` refuses
candidates that come from another model.

A :class:`Blocks` partition cuts the D coordinates into L contiguous blocks, each with
its own set of TWA coefficients:

- ``"model"``: L = 1, one global coefficient per candidate;
- ``"tensor"``: one block per parameter tensor (layer-wise TWA);
- ``"size:N"``: merge consecutive tensors until a block holds at least N elements.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

__all__ = ["Blocks", "Layout", "flatten", "unflatten", "load_flat_", "parse_blocks"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in layout")
    return dtype


class ColumnBlocks:
    """``num_blocks`` and ``numel`` of anything partitioned by column ``bounds``
    ``0 = b_0 < b_1 < ... < b_L = D`` (block partitions, packed matrices, sharded bases)."""

    bounds: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.bounds) - 1

    @property
    def numel(self) -> int:
        """D, the number of columns."""
        return self.bounds[-1]


@dataclass(frozen=True)
class Blocks(ColumnBlocks):
    """A partition of ``range(D)`` into L contiguous blocks.

    Attributes:
        bounds: L + 1 increasing offsets, ``bounds[0] == 0`` and ``bounds[-1] == D``.
        labels: a readable name per block (its first parameter's name, with ``+n`` when merged).
    """

    bounds: tuple[int, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) < 2 or self.bounds[0] != 0:
            raise ValueError(
                f"block bounds must start at 0 and hold >= 2 offsets, got {self.bounds}"
            )
        if any(b <= a for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"block bounds must be strictly increasing, got {self.bounds}")
        if len(self.labels) != len(self.bounds) - 1:
            raise ValueError("one label per block is required")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:]))

    def block_index(self) -> torch.Tensor:
        """``(D,)`` int64 tensor: the block of every coordinate."""
        sizes = torch.tensor(self.sizes)
        return torch.repeat_interleave(torch.arange(self.num_blocks), sizes)

    def to_dict(self) -> dict:
        return {"bounds": list(self.bounds), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Blocks:
        return cls(tuple(int(b) for b in d["bounds"]), tuple(str(s) for s in d["labels"]))


def parse_blocks(spec: str) -> tuple[str, int]:
    """Validate a block spec; returns ``(kind, min_size)``.

    >>> parse_blocks("size:4096")
    ('size', 4096)
    """
    if spec in ("model", "tensor"):
        return spec, 0
    if spec.startswith("size:"):
        try:
            n = int(spec.removeprefix("size:"))
        except ValueError:
            n = 0
        if n >= 1:
            return "size", n
    raise ValueError(
        f"blocks={spec!r} is not a block partition; use 'model', 'tensor' or 'size:N' with N >= 1 "
        "(e.g. 'size:65536')"
    )


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a model's trainable parameters, in order.

    >>> layout = Layout.from_module(nn.Linear(3, 2))
    >>> layout.names, layout.numel
    (('weight', 'bias'), 8)
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.shapes) == len(self.dtypes)):
            raise ValueError("layout names, shapes and dtypes must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("layout has duplicate parameter names")
        if not self.names:
            raise ValueError("layout is empty: the model has no trainable parameters")
        for name in self.dtypes:
            _dtype(name)

    @classmethod
    def from_module(cls, module: nn.Module) -> Layout:
        """The layout of ``module``'s trainable parameters (``requires_grad=True``)."""
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return cls.from_tensors(dict(params))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        return cls(
            tuple(tensors),
            tuple(tuple(int(s) for s in t.shape) for t in tensors.values()),
            tuple(_dtype_name(t.dtype) for t in tensors.values()),
        )

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        out = []
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            out.append(n)
        return tuple(out)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """``len(names) + 1`` offsets of each tensor in the flat vector."""
        acc = [0]
        for n in self.sizes:
            acc.append(acc[-1] + n)
        return tuple(acc)

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of (names, shapes, dtypes): equal iff layouts match."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> Layout:
        try:
            return cls(
                tuple(str(n) for n in d["names"]),
                tuple(tuple(int(s) for s in shape) for shape in d["shapes"]),
                tuple(str(t) for t in d["dtypes"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed layout record: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Layout:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed layout JSON: {e}") from None

    def check_compatible(self, other: Layout, what: str = "candidate") -> None:
        """Raise ``ValueError`` naming the first difference when ``other`` is another model."""
        if other.fingerprint == self.fingerprint:
            return
        for i, (a, b) in enumerate(zip(self.names, other.names)):
            if a != b or self.shapes[i] != other.shapes[i] or self.dtypes[i] != other.dtypes[i]:
                raise ValueError(
                    f"{what} does not match the model's layout at parameter {i}: expected "
                    f"{a} {list(self.shapes[i])} {self.dtypes[i]}, got {b} {list(other.shapes[i])} "
                    f"{other.dtypes[i]}; use candidates saved from the same architecture"
                )
        raise ValueError(
            f"{what} has {len(other.names)} parameter tensors, the model has {len(self.names)}; "
            "use candidates saved from the same architecture"
        )

    def blocks(self, spec: str = "tensor") -> Blocks:
        """The block partition named by ``spec`` ('model', 'tensor' or 'size:N')."""
        kind, min_size = parse_blocks(spec)
        if kind == "model":
            return Blocks((0, self.numel), ("model",))
        if kind == "tensor":
            return Blocks(self.offsets, self.names)
        bounds, labels, start_name, count = [0], [], self.names[0], 0
        for name, end in zip(self.names, self.offsets[1:]):
            if count == 0:
                start_name = name
            count += 1
            if end - bounds[-1] >= min_size:
                bounds.append(end)
                labels.append(start_name if count == 1 else f"{start_name}+{count - 1}")
                count = 0
        if count:  # a short tail joins the previous block (or forms the only one)
            if len(bounds) > 1:
                bounds[-1] = self.numel
                labels[-1] = f"{labels[-1]}+{count}"
            else:
                bounds.append(self.numel)
                labels.append(start_name if count == 1 else f"{start_name}+{count - 1}")
        return Blocks(tuple(bounds), tuple(labels))


def flatten(
    params: nn.Module | Mapping[str, torch.Tensor],
    layout: Layout,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Concatenate the layout's tensors, in layout order, into one ``(D,)`` vector.

    ``params`` is a module (its parameters are read) or a name -> tensor mapping such as a
    state dict; extra entries (buffers) are ignored, missing ones raise ``ValueError``.
    """
    tensors = dict(params.named_parameters()) if isinstance(params, nn.Module) else params
    missing = [n for n in layout.names if n not in tensors]
    if missing:
        raise ValueError(
            f"{len(missing)} parameter(s) of the layout are missing, e.g. {missing[0]!r}; "
            "the checkpoint belongs to another model or is incomplete"
        )
    parts = []
    for name, shape in zip(layout.names, layout.shapes):
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"parameter {name!r} has shape {list(t.shape)}, the layout expects {list(shape)}; "
                "the checkpoint belongs to another model"
            )
        parts.append(t.detach().reshape(-1).to(dtype))
    return torch.cat(parts)


def unflatten(vec: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: views of ``vec`` cast to each parameter's dtype."""
    if vec.dim() != 1 or vec.numel() != layout.numel:
        raise ValueError(
            f"flat vector has shape {list(vec.shape)}, the layout needs ({layout.numel},)"
        )
    out = {}
    for name, shape, dt, a, b in zip(
        layout.names, layout.shapes, layout.dtypes, layout.offsets, layout.offsets[1:]
    ):
        out[name] = vec[a:b].view(shape).to(_dtype(dt))
    return out


@torch.no_grad()
def load_flat_(module: nn.Module, vec: torch.Tensor, layout: Layout) -> nn.Module:
    """Copy the flat vector ``vec`` into ``module``'s trainable parameters, in place."""
    params = dict(module.named_parameters())
    for name, t in unflatten(vec, layout).items():
        params[name].copy_(t)
    return module

"""FSDP2 shards of the flat layout: which coordinates of θ one rank holds, and their I/O.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a DTensor sharded on dim 0
(``Shard(0)``) over a 1-D mesh of W ranks, cut like ``torch.chunk`` (chunks of
:math:`\\lceil n_0 / W \\rceil` rows; the last ones shorter or empty). Parameter i of
:class:`~twa_ray.core.layout.Layout` (``n_0`` rows of ``s_i`` elements) contributes rows
:math:`r_0{:}r_1` to rank r, i.e. the global flat coordinates

.. math::
    [\\mathrm{off}_i + r_0 s_i,\\ \\mathrm{off}_i + r_1 s_i),

and the rank's local flat vector :math:`\\theta_r` (:math:`D_r` numbers) is these ranges in
layout order. So :math:`\\theta_r` is *not* a column range of θ, and a block (a parameter, or the
whole model) straddles ranks: :mod:`twa_ray.core.sharded_subspace` reduces what needs the whole
block.

>>> from twa_ray.core.layout import Layout
>>> lay = Layout(("w", "b"), ((5, 2), (5,)), ("float32", "float32"))
>>> [LocalShards.from_layout(lay, 4, r).rows for r in range(4)]
[((0, 2), (0, 2)), ((2, 4), (2, 4)), ((4, 5), (4, 5)), ((5, 5), (5, 5))]
>>> LocalShards.from_layout(lay, 4, 2).index().tolist()
[8, 9, 14]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from twa_ray.core.layout import Blocks, Layout

__all__ = [
    "LocalBlocks",
    "LocalShards",
    "chunk_rows",
    "load_local_flat_",
    "local_flat",
    "local_grad",
]


def chunk_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``r0:r1`` of ``n`` that rank ``rank`` of ``world`` holds (``torch.chunk`` rule,
    FSDP2's dim-0 sharding: chunks of ``ceil(n / world)`` rows, trailing ranks short or empty).

    >>> [chunk_rows(5, 4, r) for r in range(4)]
    [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    size = -(-n // world)
    r0 = min(rank * size, n)
    return r0, min(r0 + size, n)


@dataclass(frozen=True)
class LocalBlocks:
    """A block partition seen from one rank.

    Attributes:
        bounds: L + 1 non-decreasing offsets in the rank's local flat vector: global block l is
            local columns ``bounds[l]:bounds[l+1]`` (empty when the rank holds none of it).
        held: the global blocks the rank holds columns of (non-empty), increasing.
        packed: ``Blocks`` over the held blocks only (strictly increasing bounds, the partition of
            the rank's packed basis), or ``None`` when the rank holds no coordinate at all.
    """

    bounds: tuple[int, ...]
    held: tuple[int, ...]
    packed: Blocks | None


@dataclass(frozen=True)
class LocalShards:
    """One rank's rows of every parameter of ``layout`` (FSDP2 ``Shard(0)`` placement).

    Attributes:
        layout: the global layout (global shapes, layout order).
        world, rank: the mesh size and this rank.
        rows: per parameter, the local dim-0 row range ``(r0, r1)``.
    """

    layout: Layout
    world: int
    rank: int
    rows: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.layout.names):
            raise ValueError("one row range per parameter of the layout is required")
        for name, shape in zip(self.layout.names, self.layout.shapes):
            if not shape:
                raise ValueError(
                    f"parameter {name!r} is a scalar: FSDP2 shards dim 0; give it a shape (1,)"
                )

    @classmethod
    def from_layout(cls, layout: Layout, world: int, rank: int) -> LocalShards:
        """The shards FSDP2's dim-0 rule gives rank ``rank`` of ``world``."""
        return cls(layout, world, rank, tuple(chunk_rows(s[0], world, rank) for s in layout.shapes))

    @classmethod
    def from_module(cls, model: nn.Module) -> LocalShards:
        """The shards of a ``fully_shard``-ed ``model`` (its trainable parameters are DTensors
        placed ``Shard(0)`` on one 1-D mesh); checked against the dim-0 rule."""
        from torch.distributed.tensor import DTensor, Shard

        layout = Layout.from_module(model)
        world = rank = -1
        rows = []
        for name, p in _params(model):
            if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"parameter {name!r} is not sharded on dim 0 over a 1-D mesh "
                    f"({type(p).__name__}); call fully_shard on the model (and its root)"
                )
            world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
            r0, r1 = chunk_rows(p.shape[0], world, rank)
            if p.to_local().shape[0] != r1 - r0:
                raise ValueError(
                    f"parameter {name!r} holds {p.to_local().shape[0]} rows on rank {rank}; "
                    f"the dim-0 chunk rule gives {r1 - r0}: use the default FSDP2 sharding"
                )
            rows.append((r0, r1))
        return cls(layout, world, rank, tuple(rows))

    @cached_property
    def row_sizes(self) -> tuple[int, ...]:
        """Elements per dim-0 row of each parameter."""
        return tuple(
            n // s[0] if s[0] else 0 for n, s in zip(self.layout.sizes, self.layout.shapes)
        )

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Local elements per parameter."""
        return tuple((r1 - r0) * s for (r0, r1), s in zip(self.rows, self.row_sizes))

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Offsets of each parameter's local part in the local flat vector."""
        acc = [0]
        for n in self.sizes:
            acc.append(acc[-1] + n)
        return tuple(acc)

    @property
    def numel(self) -> int:
        """D_r, this rank's number of coordinates."""
        return self.offsets[-1]

    @cached_property
    def global_ranges(self) -> tuple[tuple[int, int], ...]:
        """Per parameter, the global flat range this rank holds."""
        return tuple(
            (off + r0 * s, off + r1 * s)
            for off, (r0, r1), s in zip(self.layout.offsets, self.rows, self.row_sizes)
        )

    def index(self) -> torch.Tensor:
        """``(D_r,)`` int64: the global flat coordinate of every local coordinate."""
        parts = [torch.arange(a, b) for a, b in self.global_ranges]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def restrict(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's part ``(D_r,)`` of a full flat vector ``(D,)`` (a copy)."""
        if tuple(flat.shape) != (self.layout.numel,):
            raise ValueError(
                f"flat vector has shape {list(flat.shape)}, the layout needs ({self.layout.numel},)"
            )
        return torch.cat([flat[a:b] for a, b in self.global_ranges])

    def local_blocks(self, blocks: Blocks) -> LocalBlocks:
        """``blocks`` (whose bounds must fall on parameter boundaries, as every
        :meth:`Layout.blocks` partition does) as seen from this rank."""
        where = {off: i for i, off in enumerate(self.layout.offsets)}
        if blocks.numel != self.layout.numel or any(b not in where for b in blocks.bounds):
            raise ValueError(
                "blocks must cut the layout at parameter boundaries; use layout.blocks("
                "'model' | 'tensor' | 'size:N')"
            )
        bounds = tuple(self.offsets[where[b]] for b in blocks.bounds)
        held = tuple(l for l, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a)
        packed = None
        if held:
            cuts = (0, *(bounds[l + 1] for l in held))
            packed = Blocks(cuts, tuple(blocks.labels[l] for l in held))
        return LocalBlocks(bounds, held, packed)


def _params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters in layout order (:meth:`Layout.from_module`'s)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_flat(model: nn.Module, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This rank's local parameter shards, concatenated in layout order: ``(D_r,)``."""
    parts = [_local(p).detach().reshape(-1).to(dtype) for _, p in _params(model)]
    return torch.cat(parts)


def local_grad(model: nn.Module) -> torch.Tensor:
    """This rank's gradient shards (after FSDP2's reduce-scatter: the mean over the ranks'
    batches) as one float32 ``(D_r,)`` vector; zeros where a parameter got no gradient."""
    parts = []
    for _, p in _params(model):
        grad = _local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))
        parts.append(grad.reshape(-1).float())
    return torch.cat(parts)


@torch.no_grad()
def load_local_flat_(model: nn.Module, vec: torch.Tensor, shards: LocalShards) -> nn.Module:
    """Copy the local flat ``vec`` ``(D_r,)`` into ``model``'s local parameter shards in place
    (FSDP2 all-gathers them from there on the next forward)."""
    if tuple(vec.shape) != (shards.numel,):
        raise ValueError(
            f"local vector has shape {list(vec.shape)}, rank {shards.rank} holds ({shards.numel},)"
        )
    for (_, p), a, b in zip(_params(model), shards.offsets, shards.offsets[1:]):
        local = _local(p)
        local.copy_(vec[a:b].view(local.shape))  # cast to the parameter's dtype
    return model

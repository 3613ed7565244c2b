"""Projection shards: the packed basis B in the Ray object store, read zero-copy by every worker.

The driver builds the subspace from the candidate store with the core (candidates streamed, one
in memory at a time), cuts the packed ``R x D`` basis into shards of whole blocks (column ranges
``bounds[l0]:bounds[l1]`` for all rows) and ``ray.put``\\ s each shard once::

    sharded = put_subspace(store, layout, twa_config)     # driver: build, shard, put once
    subspace = sharded.materialize()                      # worker: zero-copy views, no copy of B

On a node every worker maps the same bytes of the object store, so the memory for B per node is
one copy whatever the number of workers. With ``basis_placement='shard'`` each coefficient
worker gets only the shards it owns (:meth:`ShardedSubspace.place`, :mod:`twa_ray.core.placement`):
B / W per worker and per device. The shards are never concatenated (that would copy B);
:class:`~twa_ray.core.placement.ShardedBasis` runs ``project`` / ``reconstruct`` shard by shard:

.. math::
    a[:, l_0:l_1] = \\mathrm{project}(B^{(s)}, g[c_0:c_1]), \\qquad
    \\theta[c_0:c_1] = o[c_0:c_1] + \\mathrm{reconstruct}(B^{(s)}, \\alpha[:, l_0:l_1])

for shard s over blocks ``l0:l1`` (columns ``c0:c1``): blocks never straddle shards, so both
products split exactly.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
import torch

from twa_ray.core.layout import Blocks, Layout
from twa_ray.core.placement import (
    Placement,
    PlacementKind,
    ShardedBasis,
    balanced_bounds,
    place,
    shard_plan,
)
from twa_ray.core.quant import PackedMatrix, resolve_device
from twa_ray.core.subspace import Subspace
from twa_ray.core.twa import TWAConfig, build_subspace
from twa_ray.storage import alive_nodes

__all__ = [
    "ShardedBasis",
    "ShardedSubspace",
    "ShardedView",
    "block_bytes",
    "plan_shards",
    "put_subspace",
    "group_capacity",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 256 << 20
"""Upper bound of a shard's bytes (data + scale + zero) unless one block alone is larger."""
PLACEMENT_SHARDS = 64
"""Shards of B (at most one per block) when ``basis_placement`` may shard it across workers."""
MIN_AUTO_SHARD_BYTES = 1 << 20
"""'auto' placement: no finer shards than this (a small B is replicated anyway)."""


# ----------------------------------------------------------------------------- planning


def block_bytes(pm: PackedMatrix) -> list[int]:
    """Bytes of every block of ``pm``: its packed codes for all rows plus its scale and zero."""
    itemsize = pm.data.element_size()
    return [
        pm.num_rows * ((b - a) * itemsize + 8)  # 8: float32 scale + zero per row
        for a, b in zip(pm.byte_bounds, pm.byte_bounds[1:])
    ]


def plan_shards(
    sizes: Sequence[int],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    num_shards: int | None = None,
    warn: bool = True,
) -> tuple[int, ...]:
    """Block bounds of the shards (``S + 1`` offsets into the L blocks).

    The fewest shards of balanced bytes (:func:`~twa_ray.core.placement.balanced_bounds`: the
    largest shard as small as it can be) with none over ``max_shard_bytes``, or exactly
    ``num_shards`` when given. A block larger than ``max_shard_bytes`` gets a shard of its own
    (a shard holds whole blocks; use ``blocks='size:N'`` for finer blocks).

    >>> plan_shards([4, 4, 4, 4], max_shard_bytes=8)
    (0, 2, 4)
    """
    num_blocks = len(sizes)
    if num_blocks == 0:
        raise ValueError("the basis has no blocks")
    if num_shards is not None:
        if not 1 <= num_shards <= num_blocks:
            raise ValueError(
                f"num_shards={num_shards}: must lie in [1, {num_blocks}] (the number of blocks)"
            )
        return balanced_bounds(sizes, num_shards)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be >= 1")
    if warn and max(sizes) > max_shard_bytes:
        log.warning(
            "a block of B holds %d bytes, more than max_shard_bytes=%d: it gets a shard of its own "
            "(finer blocks, blocks='size:N', give smaller shards)",
            max(sizes),
            max_shard_bytes,
        )
    for num in range(max(1, math.ceil(sum(sizes) / max_shard_bytes)), num_blocks + 1):
        bounds = balanced_bounds(sizes, num)
        groups = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
        if all(g <= max_shard_bytes or b - a == 1 for g, a, b in zip(groups, bounds, bounds[1:])):
            return bounds
    return tuple(range(num_blocks + 1))


# ----------------------------------------------------------------------------- worker side


@dataclass
class ShardedView(Subspace):
    """A core :class:`Subspace` whose basis is a :class:`ShardedBasis` (shards in shared memory).

    Drop-in for :class:`twa_ray.core.twa.TWA`, which uses ``project``, ``reconstruct``, ``to``,
    ``origin`` and ``alpha0``. On the CPU ``to`` keeps the zero-copy views.
    """

    basis: ShardedBasis  # type: ignore[assignment]
    layout: Layout | None = field(default=None)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return self.basis.project(g)

    def reconstruct(self, alpha: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.basis.reconstruct(alpha, self.origin, out=out)

    def to(self, device: torch.device | str) -> ShardedView:
        basis = self.basis.to(device)  # one copy (padded rows), or none when B is there
        if basis is self.basis and self.origin.device == resolve_device(device):
            return self
        return replace(
            self, origin=self.origin.to(device), basis=basis, alpha0=self.alpha0.to(device)
        )


def _tensor(a: np.ndarray) -> torch.Tensor:
    # Object-store arrays are read-only; torch warns on wrapping them. B is never written.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(a)


# ----------------------------------------------------------------------------- driver side


@dataclass(frozen=True, eq=False)
class ShardedSubspace:
    """A small picklable handle on a subspace whose packed basis lives in the object store.

    Pass it to workers (in ``train_loop_config`` or as a task argument); each calls
    :meth:`materialize`. The objects live as long as the driver holds this handle (Ray
    reference counting): keep it until the workers are done.

    Attributes:
        kind: "affine" or "span".
        layout: the parameter layout of the model.
        blocks: the L coefficient blocks.
        bits: bits per code of B.
        num_rows: R (K for affine, the kept rank for span).
        num_candidates: K.
        dropped: span: candidates whose direction was dropped.
        quant_error: (L,) relative quantization error per block.
        zero_blocks: affine: (K, L) bool numpy array of zero-norm blocks, else None.
        block_bounds: S + 1 offsets of the shards into the blocks.
        shard_nbytes: bytes of each shard (data + scale + zero).
        shard_refs: one ObjectRef per shard: ``{"arrays": PackedMatrix.to_arrays(), "meta": ...}``.
        base_ref: ObjectRef of ``{"origin": (D,) float32, "alpha0": (R, L) float32}``.
    """

    kind: str
    layout: Layout
    blocks: Blocks
    bits: int
    num_rows: int
    num_candidates: int
    dropped: tuple[int, ...]
    quant_error: tuple[float, ...]
    zero_blocks: np.ndarray | None
    block_bounds: tuple[int, ...]
    shard_nbytes: tuple[int, ...]
    shard_refs: tuple[Any, ...]
    base_ref: Any

    @property
    def num_shards(self) -> int:
        return len(self.shard_refs)

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def numel(self) -> int:
        return self.blocks.numel

    @property
    def nbytes(self) -> int:
        """Bytes of packed B in the object store (all shards)."""
        return sum(self.shard_nbytes)

    @property
    def coeff_shape(self) -> tuple[int, int]:
        """Shape (R, L) of the coefficients alpha."""
        return (self.num_rows, self.num_blocks)

    def materialize(self, device: torch.device | str | None = None) -> ShardedView:
        """The subspace as a core :class:`Subspace` (a :class:`ShardedView`).

        On the CPU the basis and origin are read-only zero-copy views of the object store (no
        copy of B in this process); another ``device`` gets a copy there.
        """
        values = ray.get([*self.shard_refs, self.base_ref])  # one batched get
        *shards, base = values
        packed = []
        for obj in shards:  # from_arrays wraps the read-only arrays without copying
            packed.append(PackedMatrix.from_arrays(obj["arrays"], obj["meta"]))
        basis = ShardedBasis(packed, self.block_bounds)
        view = ShardedView(
            kind=self.kind,  # type: ignore[arg-type]
            blocks=self.blocks,
            origin=_tensor(base["origin"]),
            basis=basis,
            alpha0=_tensor(base["alpha0"]).clone(),
            num_candidates=self.num_candidates,
            dropped=self.dropped,
            zero_blocks=None
            if self.zero_blocks is None
            else torch.from_numpy(self.zero_blocks.copy()),
            quant_error=torch.tensor(self.quant_error, dtype=torch.float64),
            layout=self.layout,
        )
        return view if device is None else view.to(device)

    def place(
        self,
        kind: PlacementKind,
        *,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str | None = None,
    ) -> Placement:
        """This worker's :class:`~twa_ray.core.placement.Placement` in the default process group.

        'replicate': all shards (:meth:`materialize`). 'shard': ``ray.get`` of the shards this
        worker owns only (balanced by bytes, :func:`~twa_ray.core.placement.shard_plan`). Then one
        move to ``device`` (rows padded there); on the CPU zero-copy views of the object store.
        """
        if kind == "replicate" or world == 1:
            placed = place(self.materialize(), "replicate", rank=rank, world=world)
        else:
            bb = self.block_bounds
            cols = [self.blocks.bounds[b] for b in bb]
            owners, blocks, own_cols = shard_plan(self.shard_nbytes, bb, cols, world)
            s0, s1 = owners[rank], owners[rank + 1]
            *objs, base = ray.get([*self.shard_refs[s0:s1], self.base_ref])  # one batched get
            shards = [PackedMatrix.from_arrays(o["arrays"], o["meta"]) for o in objs]
            c0, c1 = own_cols[rank], own_cols[rank + 1]
            placed = Placement(
                kind="shard",
                basis=ShardedBasis(shards, [b - bb[s0] for b in bb[s0 : s1 + 1]]),
                origin=_tensor(base["origin"])[c0:c1],
                alpha0=_tensor(base["alpha0"]).clone(),
                numel=self.numel,
                block_bounds=blocks,
                col_bounds=own_cols,
                rank=rank,
                world=world,
            )
        return placed if device is None else placed.to(device)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (no refs)."""
        return {
            "kind": self.kind,
            "bits": self.bits,
            "num_rows": self.num_rows,
            "num_blocks": self.num_blocks,
            "numel": self.numel,
            "num_candidates": self.num_candidates,
            "dropped": list(self.dropped),
            "num_shards": self.num_shards,
            "shard_nbytes": list(self.shard_nbytes),
            "nbytes": self.nbytes,
            "quant_error_max": max(self.quant_error, default=0.0),
        }


def shard_subspace(
    subspace: Subspace,
    layout: Layout,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    num_shards: int | None = None,
) -> ShardedSubspace:
    """``ray.put`` a built core subspace, its basis cut into shards of whole blocks.

    Each shard is copied once into the object store (``np.ascontiguousarray`` of the column
    slice: a contiguous array is what Ray stores out-of-band and returns zero-copy); the
    caller's ``subspace`` may be dropped afterwards.
    """
    if subspace.basis.data.device.type != "cpu":
        raise ValueError("shard a CPU subspace; the workers move their view to their device")
    if subspace.origin.numel() != layout.numel:
        raise ValueError(
            f"subspace has dimension {subspace.origin.numel()}, the layout {layout.numel}"
        )
    pm = subspace.basis
    bounds = plan_shards(block_bytes(pm), max_shard_bytes=max_shard_bytes, num_shards=num_shards)
    refs, nbytes = [], []
    for l0, l1 in zip(bounds, bounds[1:]):
        part = pm.slice_blocks(l0, l1)
        arrays = {k: np.ascontiguousarray(v) for k, v in part.to_arrays().items()}
        refs.append(ray.put({"arrays": arrays, "meta": part.meta}))
        nbytes.append(part.nbytes)
        del arrays  # one shard's copy at a time on the driver
    base = {
        "origin": np.ascontiguousarray(subspace.origin.detach().float().numpy()),
        "alpha0": np.ascontiguousarray(subspace.alpha0.detach().float().cpu().numpy()),
    }
    zero_blocks = subspace.zero_blocks
    return ShardedSubspace(
        kind=subspace.kind,
        layout=layout,
        blocks=subspace.blocks,
        bits=pm.bits,
        num_rows=pm.num_rows,
        num_candidates=subspace.num_candidates,
        dropped=tuple(subspace.dropped),
        quant_error=tuple(float(e) for e in subspace.quant_error),
        zero_blocks=None if zero_blocks is None else zero_blocks.cpu().numpy().copy(),
        block_bounds=bounds,
        shard_nbytes=tuple(nbytes),
        shard_refs=tuple(refs),
        base_ref=ray.put(base),
    )


def put_subspace(
    candidates: Any,
    layout: Layout,
    config: TWAConfig,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    num_shards: int | None = None,
) -> ShardedSubspace:
    """Build the subspace of ``config`` from ``candidates`` (a CandidateStore, streamed) and put
    its shards in the object store.

    Driver memory: the core streams the candidates (one in memory at a time); the packed basis
    is held once, plus one shard's contiguous copy while it is put.

    >>> sharded = put_subspace(store, layout, TWAConfig(bits=4))   # doctest: +SKIP
    >>> subspace = sharded.materialize()                           # doctest: +SKIP
    """
    subspace = build_subspace(candidates, layout, config)
    if num_shards is None and config.basis_placement != "replicate":
        # shardable: ~PLACEMENT_SHARDS shards, so that groups of whole shards split B evenly
        # over the workers (within B / PLACEMENT_SHARDS, or one block, of B / W each)
        floor = 1 if config.basis_placement == "shard" else MIN_AUTO_SHARD_BYTES
        fine = max(-(-subspace.basis.nbytes // PLACEMENT_SHARDS), floor)
        if fine < max_shard_bytes:
            bounds = plan_shards(block_bytes(subspace.basis), max_shard_bytes=fine, warn=False)
            num_shards = len(bounds) - 1
    return shard_subspace(subspace, layout, max_shard_bytes=max_shard_bytes, num_shards=num_shards)


def group_capacity(use_gpu: bool, device: torch.device | None = None) -> tuple[int, str]:
    """``(bytes, what)`` that B must fit in on every coefficient worker: the memory of a GPU
    (``device``, rank 0's own inside a running group, else one probed by a task; the group's
    GPUs are alike), or on the CPU the smallest object store among the nodes that can host a
    worker (every worker of a node maps the same copy of B there)."""
    if use_gpu:
        if device is not None and device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory), "GPU memory"
        probe = ray.remote(num_gpus=1, num_cpus=0)(_gpu_memory)
        return int(ray.get(probe.remote())), "GPU memory"
    stores = [
        int(n["Resources"].get("object_store_memory", 0))
        for n in alive_nodes()
        if n.get("Resources", {}).get("CPU", 0) > 0
    ]
    if not stores:
        raise RuntimeError("no alive Ray node with CPUs to host the coefficient workers")
    return min(stores), "object store of the node"


def _gpu_memory() -> int:
    return int(torch.cuda.get_device_properties(0).total_memory)

"""Projection shards: the packed basis B in the Ray object store, read zero-copy by every worker.

The driver builds the subspace from the candidate store with the core (candidates streamed, one
in memory at a time), cuts the packed ``R x D`` basis into shards of whole blocks (column ranges
``bounds[l0]:bounds[l1]`` for all rows) and ``ray.put``\\ s each shard once::

    sharded = put_subspace(store, layout, twa_config)     # driver: build, shard, put once
    subspace = sharded.materialize()                      # worker: zero-copy views, no copy of B

On a node every worker maps the same bytes of the object store, so the memory for B per node is
one copy whatever the number of workers. The shards are never concatenated (that would copy B);
:class:`ShardedBasis` runs ``project`` / ``reconstruct`` shard by shard instead:

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
import torch

from twa_ray.core.layout import Blocks, Layout
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import PackedMatrix, dequantize
from twa_ray.core.subspace import Subspace
from twa_ray.core.twa import TWAConfig, build_subspace

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ShardedBasis",
    "ShardedSubspace",
    "ShardedView",
    "block_bytes",
    "plan_shards",
    "put_subspace",
    "shard_subspace",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 256 << 20
"""Upper bound of a shard's bytes (data + scale + zero) unless one block alone is larger."""


# ----------------------------------------------------------------------------- planning


def block_bytes(pm: PackedMatrix) -> list[int]:
    """Bytes of every block of ``pm``: its packed codes for all rows plus its scale and zero."""
    itemsize = pm.data.element_size()
    return [
        pm.num_rows * ((b - a) * itemsize + 8)  # 8: float32 scale + zero per row
        for a, b in zip(pm.byte_bounds, pm.byte_bounds[1:])
    ]


def _split(sizes: Sequence[int], num: int) -> tuple[int, ...]:
    """Cut ``sizes`` into ``num`` contiguous groups of roughly equal sum: L + 1 style bounds."""
    cum = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    bounds = [0]
    for s in range(1, num):
        target = cum[-1] * s / num
        # the cut nearest the target, leaving at least one block for every later group
        lo, hi = bounds[-1] + 1, len(sizes) - (num - s)
        cut = int(np.clip(np.abs(cum[lo : hi + 1] - target).argmin() + lo, lo, hi))
        bounds.append(cut)
    bounds.append(len(sizes))
    return tuple(bounds)


def plan_shards(
    sizes: Sequence[int],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    num_shards: int | None = None,
) -> tuple[int, ...]:
    """Block bounds of the shards (``S + 1`` offsets into the L blocks).

    The fewest shards of roughly equal bytes with none over ``max_shard_bytes``, or exactly
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
        return _split(sizes, num_shards)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be >= 1")
    if max(sizes) > max_shard_bytes:
        log.warning(
            "a block of B holds %d bytes, more than max_shard_bytes=%d: it gets a shard of its own "
            "(finer blocks, blocks='size:N', give smaller shards)",
            max(sizes),
            max_shard_bytes,
        )
    for num in range(max(1, math.ceil(sum(sizes) / max_shard_bytes)), num_blocks + 1):
        bounds = _split(sizes, num)
        groups = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
        if all(g <= max_shard_bytes or b - a == 1 for g, a, b in zip(groups, bounds, bounds[1:])):
            return bounds
    return tuple(range(num_blocks + 1))


# ----------------------------------------------------------------------------- worker side


class ShardedBasis:
    """The packed ``R x D`` basis as column shards of whole blocks; never concatenated.

    Quacks like :class:`PackedMatrix` for its metadata (``bits``, ``num_rows``, ``bounds``,
    ``numel``, ``num_blocks``, ``nbytes``) and runs the two products shard by shard.

    Args:
        shards: packed matrices over consecutive block ranges (each rebased to column 0).
        block_bounds: ``S + 1`` offsets: shard s holds blocks ``block_bounds[s]:block_bounds[s+1]``.
    """

    def __init__(self, shards: Sequence[PackedMatrix], block_bounds: Sequence[int]) -> None:
        self.shards = tuple(shards)
        self.block_bounds = tuple(int(b) for b in block_bounds)
        if len(self.block_bounds) != len(self.shards) + 1 or self.block_bounds[0] != 0:
            raise ValueError(
                f"block_bounds {self.block_bounds} do not fit {len(self.shards)} shards"
            )
        bounds = [0]
        for s, pm in enumerate(self.shards):
            if pm.num_blocks != self.block_bounds[s + 1] - self.block_bounds[s]:
                raise ValueError(
                    f"shard {s} has {pm.num_blocks} blocks, block_bounds say otherwise"
                )
            if pm.num_rows != self.shards[0].num_rows or pm.bits != self.shards[0].bits:
                raise ValueError(f"shard {s} has another number of rows or bits than shard 0")
            bounds += [bounds[-1] + b for b in pm.bounds[1:]]
        self.bounds = tuple(bounds)
        self.col_bounds = tuple(bounds[b] for b in self.block_bounds)  # column range per shard

    @property
    def bits(self) -> int:
        return self.shards[0].bits

    @property
    def num_rows(self) -> int:
        return self.shards[0].num_rows

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_blocks(self) -> int:
        return len(self.bounds) - 1

    @property
    def numel(self) -> int:
        """D, the number of columns."""
        return self.bounds[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of all shards' data, scale and zero."""
        return sum(pm.nbytes for pm in self.shards)

    @property
    def device(self) -> torch.device:
        return self.shards[0].data.device

    def _ranges(self) -> Iterator[tuple[PackedMatrix, int, int, int, int]]:
        """``(shard, l0, l1, c0, c1)``: each shard with its block and column range."""
        return zip(
            self.shards,
            self.block_bounds,
            self.block_bounds[1:],
            self.col_bounds,
            self.col_bounds[1:],
        )

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``a[k, l] = <B[k, l], g>``: (D,) -> (R, L) float32."""
        if len(self.shards) == 1:
            return project(self.shards[0], g)
        if tuple(g.shape) != (self.numel,):
            raise ValueError(f"g must have shape ({self.numel},), got {list(g.shape)}")
        g = g.contiguous()
        return torch.cat([project(pm, g[c0:c1]) for pm, _, _, c0, c1 in self._ranges()], dim=1)

    def reconstruct(
        self,
        alpha: torch.Tensor,
        origin: torch.Tensor | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``theta = origin + sum alpha[k, l] B[k, l]``: (R, L) -> (D,) float32, written in ``out``."""
        if len(self.shards) == 1:
            return reconstruct(self.shards[0], alpha, origin, out=out)
        if tuple(alpha.shape) != (self.num_rows, self.num_blocks):
            raise ValueError(
                f"alpha must have shape ({self.num_rows}, {self.num_blocks}), got {list(alpha.shape)}"
            )
        if out is None:
            out = torch.empty(self.numel, device=alpha.device)
        elif tuple(out.shape) != (self.numel,) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous ({self.numel},) tensor")
        for pm, l0, l1, c0, c1 in self._ranges():
            o = None if origin is None else origin[c0:c1]
            reconstruct(pm, alpha[:, l0:l1].contiguous(), o, out=out[c0:c1])
        return out

    def dequantize(self) -> torch.Tensor:
        """The float32 ``(R, D)`` matrix (tests and small matrices only)."""
        return torch.cat([dequantize(pm) for pm in self.shards], dim=1)

    def to(self, device: torch.device | str) -> ShardedBasis:
        shards = [
            replace(pm, data=pm.data.to(device), scale=pm.scale.to(device), zero=pm.zero.to(device))
            for pm in self.shards
        ]
        return ShardedBasis(shards, self.block_bounds)


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
        return replace(
            self,
            origin=self.origin.to(device),
            basis=self.basis.to(device),
            alpha0=self.alpha0.to(device),
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
    return shard_subspace(subspace, layout, max_shard_bytes=max_shard_bytes, num_shards=num_shards)

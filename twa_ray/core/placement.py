"""Basis placement: where the packed basis B lives in a group of W coefficient workers.

B is held as column shards of whole blocks (:class:`ShardedBasis`). Worker r has the gradient
:math:`g^{(r)}` of its batch; the step needs :math:`a = \\frac1W \\sum_r B g^{(r)}` on every worker.

**replicate**: every worker holds all of B (one object-store copy per node on CPU, one device
copy per worker on GPU):

.. math::
    a^{(r)} = B g^{(r)}, \\qquad
    a = \\tfrac1W \\textstyle\\sum_{r=0}^{W-1} a^{(r)} \\ \\text{(all-gather of } R \\cdot L
    \\text{ numbers)}, \\qquad \\theta = o + \\textstyle\\sum \\alpha B \\ \\text{(local)}

**shard**: worker s owns the shards ``owners[s]:owners[s+1]`` (blocks ``l_s:l_{s+1}``, columns
``c_s:c_{s+1}``; contiguous, balanced by bytes) and holds only those, B/W per worker:

.. math::
    &g^{(r)}[c_s{:}c_{s+1}] \\to s \\ \\text{(all-to-all: } 4D(W-1)/W \\text{ bytes out)}, \\quad
    a[:, l_s{:}l_{s+1}] = \\tfrac1W \\textstyle\\sum_r B_s \\, g^{(r)}[c_s{:}c_{s+1}] \\\\
    &a = \\text{all-gather of the block slices } (R \\cdot L), \\quad
    \\alpha \\leftarrow \\mathrm{step}(\\alpha, a) \\ \\text{(every worker, all of } \\alpha) \\\\
    &\\theta[c_s{:}c_{s+1}] = o_s + B_s \\alpha[:, l_s{:}l_{s+1}], \\quad
    \\theta = \\text{all-gather of the slices } (4D(W-1)/W \\text{ bytes in})

Both placements make the same kernel calls (one per shard) on the same numbers and sum the W
products in rank order in float64, so their alphas are **bitwise equal** with deterministic
kernels (CPU; on the GPU the Triton ``project`` adds tiles with float atomics: equal to float32
rounding), and the replicas agree whatever algorithm the collectives use. The price: a shard
worker projects W gradient slices (reads B_s W times, B bytes per step like a replica; the wire
bytes equal a reduce-scatter's). Summing the gradients first (a reduce-scatter of g, B_s read
once) would round differently: the placements would agree only to float32 rounding of the
projections, amplified by cancellation in ``a``. alpha is R·L numbers: every worker steps all of it, so the optimizer,
its state and checkpoints are the same in both placements.

:func:`choose` picks ``auto``: replicate while B plus the model fit in half of a worker's
memory, else shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from twa_ray.core.layout import ColumnBlocks
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import PackedMatrix, dequantize, resolve_device

__all__ = ["Placement", "ShardedBasis", "balanced_bounds", "choose", "place", "shard_plan"]

PlacementKind = Literal["replicate", "shard"]

FIT_FRACTION = 0.5
"""auto: replicate while B + the model take at most this fraction of a worker's memory."""


# ----------------------------------------------------------------------------- the basis


class ShardedBasis(ColumnBlocks):
    """The packed ``R x D`` basis as column shards of whole blocks; never concatenated.

    Quacks like :class:`PackedMatrix` for its metadata (``bits``, ``num_rows``, ``bounds``,
    ``numel``, ``num_blocks``, ``nbytes``) and runs the two products shard by shard:

    .. math::
        a[:, l_0:l_1] = \\mathrm{project}(B^{(s)}, g[c_0:c_1]), \\qquad
        \\theta[c_0:c_1] = o[c_0:c_1] + \\mathrm{reconstruct}(B^{(s)}, \\alpha[:, l_0:l_1])

    Args:
        shards: packed matrices over consecutive block ranges (each rebased to column 0).
        block_bounds: ``S + 1`` offsets: shard s holds blocks ``block_bounds[s]:block_bounds[s+1]``.
    """

    def __init__(self, shards: Sequence[PackedMatrix], block_bounds: Sequence[int]) -> None:
        self.shards = tuple(shards)
        self.block_bounds = tuple(int(b) for b in block_bounds)
        if (
            not self.shards
            or len(self.block_bounds) != len(self.shards) + 1
            or self.block_bounds[0] != 0
        ):
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

    @classmethod
    def split(cls, pm: PackedMatrix, block_bounds: Sequence[int]) -> ShardedBasis:
        """``pm`` cut at ``block_bounds`` (views, no copy)."""
        return cls(
            [pm.slice_blocks(a, b) for a, b in zip(block_bounds, block_bounds[1:])], block_bounds
        )

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
        """On ``device`` through :meth:`PackedMatrix.to` (rows padded for the GPU kernels); the
        same object when every shard is there already."""
        shards = [pm.to(device) for pm in self.shards]
        if all(a is b for a, b in zip(shards, self.shards)):
            return self
        return ShardedBasis(shards, self.block_bounds)


# ----------------------------------------------------------------------------- planning


def balanced_bounds(sizes: Sequence[int], parts: int) -> tuple[int, ...]:
    """Cut ``sizes`` into ``parts`` contiguous non-empty groups whose largest sum is smallest.

    Returns ``parts + 1`` offsets. Binary search on the largest group's sum, greedy packing.

    >>> balanced_bounds([5, 1, 1, 1, 1, 1], 2)
    (0, 1, 6)
    """
    n = len(sizes)
    if not 1 <= parts <= n:
        raise ValueError(
            f"cannot cut {n} shards into {parts} non-empty groups; need 1 <= parts <= {n}"
        )

    def greedy(cap: int) -> list[int]:
        cuts, acc = [0], 0
        for i, s in enumerate(sizes):
            if acc + s > cap and i > cuts[-1]:
                cuts.append(i)
                acc = 0
            acc += s
        return cuts + [n]

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(greedy(mid)) - 1 <= parts:
            hi = mid
        else:
            lo = mid + 1
    cuts = greedy(lo)
    while len(cuts) - 1 < parts:  # split groups of several items: the maximum cannot grow
        i = next(i for i in range(len(cuts) - 1, 0, -1) if cuts[i] - cuts[i - 1] > 1)
        cuts.insert(i, cuts[i] - 1)
    return tuple(cuts)


def choose(
    requested: str,
    *,
    basis_bytes: int,
    model_bytes: int,
    capacity_bytes: int,
    world: int,
    num_shards: int,
    where: str = "device memory",
) -> tuple[PlacementKind, str]:
    """The placement for ``requested`` ('replicate', 'shard' or 'auto') and the reason.

    auto: replicate while ``basis_bytes + model_bytes <= FIT_FRACTION * capacity_bytes`` (B and
    the model fit comfortably in one worker's ``where``), else shard. Shard needs one worker or
    more per shard of B: with fewer shards than workers auto replicates and 'shard' is an error.
    """
    mib = 1 << 20
    need = f"B {basis_bytes / mib:.1f} MiB + model {model_bytes / mib:.1f} MiB"
    if requested == "replicate":
        return "replicate", "requested"
    if requested == "shard":
        if world == 1:
            return "replicate", "one worker holds all of B"
        if num_shards < world:
            raise ValueError(
                f"basis_placement='shard' needs a shard of B per worker: {num_shards} shard(s) for "
                f"{world} workers; use finer blocks (blocks='size:N'), fewer workers, or 'replicate'"
            )
        return "shard", "requested"
    if requested != "auto":
        raise ValueError(f"basis_placement={requested!r}: use 'replicate', 'shard' or 'auto'")
    if world == 1:
        return "replicate", "auto: one worker holds all of B"
    limit = f"{FIT_FRACTION:.0%} of {capacity_bytes / mib:.0f} MiB {where}"
    if basis_bytes + model_bytes <= FIT_FRACTION * capacity_bytes:
        return "replicate", f"auto: {need} fit in {limit}"
    if num_shards < world:
        return (
            "replicate",
            f"auto: {need} exceed {limit}, but B has {num_shards} shard(s) for {world} workers",
        )
    return "shard", f"auto: {need} exceed {limit}"


# ----------------------------------------------------------------------------- placement


@dataclass(eq=False)
class Placement:
    """This worker's part of the subspace and the collectives of a coefficient step.

    Attributes:
        kind: 'replicate' or 'shard'.
        basis: the shards this worker holds (all of them for replicate).
        origin: float32, the columns this worker reconstructs (all D for replicate).
        alpha0: (R, L) float32, the SWA point (all of it on every worker).
        points: (K, R, L) float32, the coefficients of each candidate (``Subspace.points``;
            None when the subspace came without them).
        numel: D.
        block_bounds, col_bounds: shard: W + 1 block / column offsets, worker s owns blocks
            ``block_bounds[s]:block_bounds[s+1]``; replicate: ``(0, L)`` / ``(0, D)``.
        rank, world, group: this worker in its process group (world 1: no communication).
    """

    kind: PlacementKind
    basis: ShardedBasis
    origin: torch.Tensor
    alpha0: torch.Tensor
    numel: int
    block_bounds: tuple[int, ...]
    col_bounds: tuple[int, ...]
    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None
    points: torch.Tensor | None = None

    def __post_init__(self) -> None:
        (l0, l1), (c0, c1) = self.own_blocks, self.own_cols
        if (
            self.basis.num_blocks != l1 - l0
            or self.basis.numel != c1 - c0
            or self.origin.numel() != c1 - c0
        ):
            raise ValueError(
                f"worker {self.rank} holds blocks {l0}:{l1} (columns {c0}:{c1}); its basis has "
                f"{self.basis.num_blocks} blocks, {self.basis.numel} columns, origin {self.origin.numel()}"
            )

    @property
    def own_blocks(self) -> tuple[int, int]:
        """The blocks ``l0:l1`` this worker projects and reconstructs."""
        i = self.rank if self.kind == "shard" else 0
        return self.block_bounds[i], self.block_bounds[i + 1]

    @property
    def own_cols(self) -> tuple[int, int]:
        """The columns ``c0:c1`` of those blocks."""
        i = self.rank if self.kind == "shard" else 0
        return self.col_bounds[i], self.col_bounds[i + 1]

    @property
    def num_rows(self) -> int:
        return self.basis.num_rows

    @property
    def num_blocks(self) -> int:
        return self.block_bounds[-1]

    @property
    def device(self) -> torch.device:
        return self.basis.device

    @property
    def held_bytes(self) -> int:
        """Bytes of B (codes, scales, zeros) held by this worker."""
        return self.basis.nbytes

    @property
    def wire_bytes_per_step(self) -> int:
        """Bytes this worker sends per step (a ring all-gather sends W - 1 chunks)."""
        w = self.world
        if w == 1:
            return 0
        if self.kind == "replicate":
            return 4 * self.num_rows * self.num_blocks * (w - 1)  # its (R, L) to every other worker
        c0, c1 = self.own_cols
        max_cols = max(b - a for a, b in zip(self.col_bounds, self.col_bounds[1:]))
        max_blocks = max(b - a for a, b in zip(self.block_bounds, self.block_bounds[1:]))
        # g to the other owners + theta slices + a slices (all-gathers padded to the largest)
        return 4 * ((self.numel - (c1 - c0)) + (max_cols + self.num_rows * max_blocks) * (w - 1))

    def to(self, device: torch.device | str) -> Placement:
        """On ``device`` (B padded by :meth:`PackedMatrix.to`); ``self`` when already there."""
        basis = self.basis.to(device)
        if basis is self.basis and self.origin.device == resolve_device(device):
            return self
        return Placement(
            kind=self.kind,
            basis=basis,
            origin=self.origin.to(device),
            alpha0=self.alpha0.to(device),
            points=None if self.points is None else self.points.to(device),
            numel=self.numel,
            block_bounds=self.block_bounds,
            col_bounds=self.col_bounds,
            rank=self.rank,
            world=self.world,
            group=self.group,
        )

    # -- the step's collectives -------------------------------------------------------------
    def _mean(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(1/W) sum_r parts[r]`` in float64, rank order, then float32 (the same bits anywhere)."""
        if len(parts) == 1:
            return parts[0]
        total = torch.zeros(parts[0].shape, dtype=torch.float64, device=parts[0].device)
        for p in parts:
            total += p.double()
        return (total / len(parts)).float()

    def mean_grad(self, g: torch.Tensor) -> torch.Tensor:
        """``a = (1/W) sum_r B g^(r)`` (R, L) float32 from this worker's gradient ``g`` (D,)."""
        if self.world == 1:
            return self.basis.project(g)
        if self.kind == "replicate":
            a = self.basis.project(g)
            parts = [torch.empty_like(a) for _ in range(self.world)]
            dist.all_gather(parts, a, group=self.group)
            return self._mean(parts)
        # shard: every worker's g on my columns, projected one by one, summed in rank order
        sizes = [b - a for a, b in zip(self.col_bounds, self.col_bounds[1:])]
        own = sizes[self.rank]
        recv = torch.empty(self.world * own, device=g.device)
        dist.all_to_all_single(
            recv,
            g.contiguous(),
            output_split_sizes=[own] * self.world,
            input_split_sizes=sizes,
            group=self.group,
        )
        parts = [self.basis.project(recv[r * own : (r + 1) * own]) for r in range(self.world)]
        a_own = self._mean(parts)
        return self._gather(a_own.t().contiguous(), self.block_bounds).t().contiguous()

    def _gather(self, mine: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
        """Concatenate every worker's ``mine`` ((n_s, ...) rows ``bounds[s]:bounds[s+1]``) along dim 0:
        an all-gather of equal chunks padded to the largest."""
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        width = max(sizes)
        send = torch.zeros((width, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        send[: mine.shape[0]] = mine
        recv = torch.empty((self.world, *send.shape), dtype=mine.dtype, device=mine.device)
        dist.all_gather(list(recv.unbind(0)), send, group=self.group)
        return torch.cat([recv[s, :n] for s, n in enumerate(sizes)])

    def reconstruct(self, alpha: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta = o + sum alpha B`` as (D,) float32 (written into ``out`` when given)."""
        if self.kind == "replicate" or self.world == 1:
            return self.basis.reconstruct(alpha, self.origin, out=out)
        l0, l1 = self.own_blocks
        mine = self.basis.reconstruct(alpha[:, l0:l1].contiguous(), self.origin)
        theta = self._gather(mine, self.col_bounds)
        if out is None:
            return theta
        out.copy_(theta)
        return out


def place(
    subspace: object,
    kind: PlacementKind,
    *,
    shard_bounds: Sequence[int] | None = None,
    rank: int = 0,
    world: int = 1,
    group: dist.ProcessGroup | None = None,
) -> Placement:
    """This worker's :class:`Placement` of a whole ``subspace`` (anything with ``basis``: a
    PackedMatrix or ShardedBasis, ``origin`` and ``alpha0``), held as shards at ``shard_bounds``
    (block offsets; default: the basis's own shards, or one). Slices are views: the caller drops
    the rest (or builds the Placement from its own shards, as the Ray workers do)."""
    basis = subspace.basis  # type: ignore[attr-defined]
    if isinstance(basis, PackedMatrix):
        basis = ShardedBasis.split(basis, shard_bounds or (0, basis.num_blocks))
    elif shard_bounds is not None and tuple(shard_bounds) != basis.block_bounds:
        raise ValueError("a ShardedBasis keeps its own shard bounds; pass shard_bounds=None")
    origin, alpha0 = subspace.origin, subspace.alpha0  # type: ignore[attr-defined]
    points = getattr(subspace, "points", None)
    if kind == "replicate" or world == 1:
        return Placement(
            kind="replicate",
            basis=basis,
            origin=origin,
            alpha0=alpha0,
            numel=basis.numel,
            block_bounds=(0, basis.num_blocks),
            col_bounds=(0, basis.numel),
            rank=rank,
            world=world,
            group=group,
            points=points,
        )
    owners, blocks, cols = shard_plan(
        [pm.nbytes for pm in basis.shards], basis.block_bounds, basis.col_bounds, world
    )
    s0, s1 = owners[rank], owners[rank + 1]
    own = ShardedBasis(
        basis.shards[s0:s1], [b - basis.block_bounds[s0] for b in basis.block_bounds[s0 : s1 + 1]]
    )
    return Placement(
        kind="shard",
        basis=own,
        origin=origin[cols[rank] : cols[rank + 1]],
        alpha0=alpha0,
        numel=basis.numel,
        block_bounds=blocks,
        col_bounds=cols,
        rank=rank,
        world=world,
        group=group,
        points=points,
    )


def shard_plan(
    shard_nbytes: Sequence[int], block_bounds: Sequence[int], col_bounds: Sequence[int], world: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(owners, blocks, cols)``: worker s owns shards ``owners[s]:owners[s+1]`` (balanced by
    bytes), i.e. blocks ``blocks[s]:blocks[s+1]`` and columns ``cols[s]:cols[s+1]``, given the
    shards' bytes and their ``S + 1`` block and column offsets."""
    owners = balanced_bounds(shard_nbytes, world)
    return owners, tuple(block_bounds[s] for s in owners), tuple(col_bounds[s] for s in owners)

"""The TWA subspace of an FSDP2-sharded model: each rank builds and holds its columns of B.

Rank r holds the coordinates :math:`\\theta_r` (:mod:`twa_ray.core.sharded`) of every candidate
:math:`w_{k,r}`, of the origin :math:`o_r` and of the basis :math:`B_r` (the columns of B it
holds). The coefficient step never gathers the model:

.. math::
    a = B g = \\textstyle\\sum_r B_r g_r \\quad (\\text{all-reduce SUM of } R \\cdot L
    \\text{ partial sums}), \\qquad \\theta_r = o_r + B_r^\\top \\alpha

with :math:`g_r` the rank's gradient shard after FSDP2's reduce-scatter (already the mean over
the ranks' batches). The affine build (:func:`build_affine_sharded`) reduces what needs a whole
block: the block norms :math:`\\lVert (w_k - c)|_l \\rVert^2 = \\sum_r \\lVert (w_{k,r} - c_r)|_l
\\rVert^2` (SUM), the code ranges (MIN / MAX, exact) and the quantization error (SUM). So the
codes of :math:`B_r` are the unsharded codes (:func:`~twa_ray.core.subspace.build_affine`)
restricted to rank r's columns, and ``alpha0``, ``points``, ``zero_blocks``, ``quant_error`` are
the same on every rank (norms and errors up to float64 summation order).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist

from twa_ray.core.layout import Blocks
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import PackedMatrix, PackedMatrixBuilder, dequantize
from twa_ray.core.sharded import LocalBlocks, LocalShards
from twa_ray.core.subspace import CandidateStream, _checked, _mean, _normalized, _row

__all__ = ["ShardedSubspace", "build_affine_sharded", "project_sharded"]


@dataclass(eq=False)
class ShardedSubspace:
    """One rank's part of a subspace over an FSDP2-sharded model.

    Attributes:
        kind: "affine".
        blocks: the global column partition (L blocks).
        shards: the rank's coordinates (:class:`~twa_ray.core.sharded.LocalShards`).
        local: ``blocks`` seen from the rank (:class:`~twa_ray.core.sharded.LocalBlocks`).
        origin: (D_r,) float32, the rank's coordinates of o.
        basis: the packed ``R x D_r`` columns of B over the held blocks (``local.packed``), or
            ``None`` when the rank holds no coordinate.
        alpha0, num_candidates, dropped, zero_blocks, quant_error, points: as in
            :class:`~twa_ray.core.subspace.Subspace`, global, the same on every rank.
        group: the process group of the mesh (``None``: the default group).
    """

    kind: Literal["affine", "span"]
    blocks: Blocks
    shards: LocalShards
    local: LocalBlocks
    origin: torch.Tensor
    basis: PackedMatrix | None
    alpha0: torch.Tensor
    num_candidates: int
    dropped: tuple[int, ...] = ()
    zero_blocks: torch.Tensor | None = None
    quant_error: torch.Tensor | None = None
    points: torch.Tensor | None = None
    group: dist.ProcessGroup | None = None

    @property
    def num_rows(self) -> int:
        return int(self.alpha0.shape[0])

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def numel(self) -> int:
        """D, the global dimension (the model's layout)."""
        return self.blocks.numel

    @property
    def held_bytes(self) -> int:
        """Bytes of B (codes, scales, zeros) this rank holds."""
        return 0 if self.basis is None else self.basis.nbytes

    def partial_project(self, g: torch.Tensor) -> torch.Tensor:
        """``B_r g_r``: this rank's share (R, L) of ``a`` from its gradient shard (D_r,)."""
        if tuple(g.shape) != (self.shards.numel,):
            raise ValueError(
                f"gradient shard has shape {list(g.shape)}, rank {self.shards.rank} holds "
                f"({self.shards.numel},)"
            )
        out = torch.zeros(self.num_rows, self.num_blocks, device=g.device)
        if self.basis is not None:
            out[:, list(self.local.held)] = project(self.basis, g.contiguous())
        return out

    def mean_grad(self, g: torch.Tensor) -> torch.Tensor:
        """:func:`project_sharded` (the name :class:`~twa_ray.core.twa.TWA` calls)."""
        return project_sharded(self, g)

    def reconstruct(self, alpha: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta_r = o_r + B_r^T alpha``: (R, L) -> (D_r,) float32, no communication."""
        if tuple(alpha.shape) != (self.num_rows, self.num_blocks):
            raise ValueError(
                f"alpha must have shape ({self.num_rows}, {self.num_blocks}), got {list(alpha.shape)}"
            )
        if self.basis is None:
            return self.origin.clone() if out is None else out.copy_(self.origin)
        held = alpha[:, list(self.local.held)].contiguous()
        return reconstruct(self.basis, held, self.origin, out=out)

    def to(self, device: torch.device | str) -> ShardedSubspace:
        return replace(
            self,
            origin=self.origin.to(device),
            basis=None if self.basis is None else self.basis.to(device),
            alpha0=self.alpha0.to(device),
            points=None if self.points is None else self.points.to(device),
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 ``(R, D_r)`` columns of B (tests and small matrices only)."""
        if self.basis is None:
            return torch.zeros(self.num_rows, 0)
        return dequantize(self.basis)


def project_sharded(sub: ShardedSubspace, g: torch.Tensor) -> torch.Tensor:
    """``a = sum_r B_r g_r``: (R, L) float32 on every rank of ``sub.group``, from this rank's
    gradient shard ``g`` (D_r,) (after FSDP2's reduce-scatter: already the mean over the ranks'
    batches, so the sum over ranks is the data-parallel path's mean ``a``). One all-reduce SUM
    of R·L numbers; every rank calls it."""
    return _all_reduce(sub.partial_project(g), dist.ReduceOp.SUM, sub.group)


def _all_reduce(
    t: torch.Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _block_sq(x: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    """``||x|_l||^2`` per local block (0 for an empty one), float64 (L,)."""
    x = x.double()
    return torch.stack([x[a:b].square().sum() for a, b in zip(bounds, bounds[1:])])


def _block_range(x: torch.Tensor, bounds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` per local block, float32 (L,); ``(+inf, -inf)`` for an empty block."""
    lo = torch.full((len(bounds) - 1,), float("inf"))
    hi = torch.full((len(bounds) - 1,), float("-inf"))
    for l, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b > a:
            lo[l], hi[l] = x[a:b].float().aminmax()
    return lo, hi


def build_affine_sharded(
    candidates: CandidateStream,
    shards: LocalShards,
    *,
    blocks: Blocks,
    bits: int = 4,
    granularity: Literal["row", "block"] = "row",
    group: dist.ProcessGroup | None = None,
) -> ShardedSubspace:
    """Affine layer-wise subspace from a stream of this rank's candidate shards ``(D_r,)``.

    Every rank of ``group`` calls it with its own shards of the same K candidates, in the same
    order. Passes over the stream (as :func:`~twa_ray.core.subspace.build_affine`, one more for
    the ranges, which need the reduced norms): (1) the mean c_r, (2) block norms (all-reduce SUM
    of squares), (3) the code ranges (all-reduce MIN / MAX), (4) quantize each normalized row,
    (5) the quantization error (all-reduce SUM). Collectives: 4 all-reduces of K·L numbers or
    fewer.
    """
    numel, local = shards.numel, shards.local_blocks(blocks)
    bounds = local.bounds
    center64, num = _mean(candidates, numel)
    center = center64.float()
    sq = torch.stack(
        [_block_sq(w.double() - center64, bounds) for w in _checked(candidates, numel)]
    )
    norms = _all_reduce(sq, dist.ReduceOp.SUM, group).sqrt()  # (K, L) float64
    zero_blocks = norms == 0
    if bool(zero_blocks.all()):
        raise ValueError(
            "all candidates are identical: there is nothing to average; "
            "sample candidates from different steps or checkpoints"
        )
    lo, hi = _ranges(candidates, numel, center64, norms, bounds, granularity)
    _all_reduce(lo, dist.ReduceOp.MIN, group)
    _all_reduce(hi, dist.ReduceOp.MAX, group)
    basis = None
    err_sq = torch.zeros(blocks.num_blocks, dtype=torch.float64)
    ref_sq = torch.zeros(blocks.num_blocks, dtype=torch.float64)
    if local.packed is not None:
        held = list(local.held)
        ranges = {"lo": lo[..., held], "hi": hi[..., held]}
        builder = PackedMatrixBuilder(num, local.packed, bits, granularity, **ranges)
        for k, w in enumerate(_checked(candidates, numel)):
            builder.set_row(k, _normalized(w.float() - center, norms[k], bounds))
        basis = builder.finish()
        for k, w in enumerate(_checked(candidates, numel)):
            row = _normalized(w.float() - center, norms[k], bounds)
            approx = dequantize(_row(basis, k))[0]
            err_sq[held] += _block_sq(row - approx, local.packed.bounds)
            ref_sq[held] += _block_sq(row, local.packed.bounds)
    err_sq, ref_sq = _all_reduce(torch.stack([err_sq, ref_sq]), dist.ReduceOp.SUM, group)
    quant_error = torch.where(ref_sq > 0, (err_sq / ref_sq.clamp_min(1e-300)).sqrt(), 0.0)
    points = torch.zeros(num, num, blocks.num_blocks)
    points[torch.arange(num), torch.arange(num)] = norms.float()  # w_k = c + sum_l n_kl B_kl
    return ShardedSubspace(
        kind="affine",
        blocks=blocks,
        shards=shards,
        local=local,
        origin=center,
        basis=basis,
        alpha0=torch.zeros(num, blocks.num_blocks),
        num_candidates=num,
        zero_blocks=zero_blocks,
        quant_error=quant_error,
        points=points,
        group=group,
    )


def _ranges(
    candidates: CandidateStream,
    numel: int,
    center64: torch.Tensor,
    norms: torch.Tensor,
    bounds: tuple[int, ...],
    granularity: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's code ranges of the normalized rows: (K, L) per row and block ('row'), or
    (L,) per block ('block'), as :func:`~twa_ray.core.subspace.build_affine` computes them."""
    los, his = [], []
    for k, w in enumerate(_checked(candidates, numel)):
        if granularity == "block":  # build_affine's block ranges: from the float64 delta
            row = _normalized((w.double() - center64).float(), norms[k], bounds)
        else:  # PackedMatrixBuilder's row ranges: from the row it quantizes
            row = _normalized(w.float() - center64.float(), norms[k], bounds)
        lo, hi = _block_range(row, bounds)
        los.append(lo)
        his.append(hi)
    lo, hi = torch.stack(los), torch.stack(his)
    if granularity == "block":
        return lo.amin(dim=0), hi.amax(dim=0)
    return lo, hi

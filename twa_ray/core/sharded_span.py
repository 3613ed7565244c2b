"""The span subspace (L = 1) of an FSDP2-sharded model: an orthonormal basis across ranks.

The candidates are orthonormalized by a tall-skinny QR across ranks (TSQR): each rank factors
its rows :math:`M_r^\\top = Q_r R_r`, the ranks all-gather the :math:`K \\times K` factors
:math:`R_r` and factor their stack once more, :math:`[R_0; \\ldots; R_{W-1}] = \\tilde Q R`, so
:math:`M^\\top = Q R` with :math:`Q|_r = Q_r \\tilde Q_r`. R is the unsharded Householder R up to
the signs of its rows: the sharded build fixes :math:`\\mathrm{diag}\\,R \\ge 0`, so its basis
rows equal :func:`~twa_ray.core.subspace.build_span`'s up to sign (and float64 rounding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from twa_ray.core.bn import all_reduce_
from twa_ray.core.quant import PackedMatrix, PackedMatrixBuilder, dequantize
from twa_ray.core.sharded import LocalBlocks, LocalShards
from twa_ray.core.sharded_subspace import ShardedSubspace, on_every_rank
from twa_ray.core.subspace import CandidateStream, _checked

__all__ = ["build_span_sharded"]


def build_span_sharded(
    candidates: CandidateStream,
    shards: LocalShards,
    *,
    bits: int = 4,
    center: bool = True,
    rtol: float = 1e-6,
    group: dist.ProcessGroup | None = None,
) -> ShardedSubspace:
    """Span subspace (L = 1) from this rank's candidate shards ``(D_r,)`` by TSQR (module
    docstring); rows of B with ``diag R >= 0``. Directions with ``|R_ii| <= rtol max |R_ii|`` are
    dropped. Memory: this rank's K x D_r candidate matrix and its Q in float64. Collectives: one
    all-gather of K x K, all-reduces of R·K numbers or fewer."""
    numel, rank = shards.numel, dist.get_rank(group) if dist.is_initialized() else 0
    rows = on_every_rank(lambda: [w.double() for w in _checked(candidates, numel)], group)
    num = len(rows)
    if num < 2:
        raise ValueError(
            f"TWA needs at least 2 candidates, got {num}; sample more often "
            "(a smaller sample_interval) or add checkpoints to the store"
        )
    mat = torch.stack(rows)  # (K, D_r) float64
    del rows
    mean = mat.mean(dim=0)
    if center:
        mat -= mean
    q_loc, r_loc = torch.linalg.qr(mat.T, mode="reduced")  # (D_r, k), (k, K), k = min(D_r, K)
    r_pad = torch.zeros(num, num, dtype=torch.float64)
    r_pad[: r_loc.shape[0]] = r_loc
    parts = [r_pad]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(r_pad) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, r_pad, group=group)
    q2, r = torch.linalg.qr(torch.cat(parts), mode="reduced")  # the same on every rank
    sign = torch.where(r.diagonal() < 0, -1.0, 1.0).double()
    q = q_loc @ (q2[rank * num : rank * num + r_loc.shape[0]] * sign)  # (D_r, K)
    diag = r.diagonal().abs()
    keep = diag > rtol * diag.max() if diag.max() > 0 else torch.zeros_like(diag, dtype=torch.bool)
    if not bool(keep.any()):
        raise ValueError(
            "all candidates are identical: there is nothing to average; "
            "sample candidates from different steps or checkpoints"
        )
    basis64 = q[:, keep].T.contiguous()  # (R, D_r)
    blocks = shards.layout.blocks("model")
    local = shards.local_blocks(blocks)
    basis, quant_error = _quantize_rows(basis64, local, bits, group)
    # alpha0 and points are sums over all coordinates: partial products, all-reduced
    sums = torch.cat([basis64 @ mean, (mat @ basis64.T).reshape(-1)])
    sums = all_reduce_(sums, dist.ReduceOp.SUM, group)
    num_rows = basis64.shape[0]
    alpha0 = torch.zeros(num_rows, 1) if center else sums[:num_rows].float()[:, None]
    return ShardedSubspace(
        kind="span",
        blocks=blocks,
        shards=shards,
        local=local,
        origin=mean.float() if center else torch.zeros(numel),
        basis=basis,
        alpha0=alpha0,
        num_candidates=num,
        dropped=tuple(int(i) for i in torch.nonzero(~keep).flatten()),
        quant_error=quant_error,
        points=sums[num_rows:].reshape(num, num_rows).float()[:, :, None],  # rows: w_k - o
        group=group,
    )


def _quantize_rows(
    basis64: torch.Tensor, local: LocalBlocks, bits: int, group: dist.ProcessGroup | None
) -> tuple[PackedMatrix | None, torch.Tensor]:
    """This rank's columns of the one-block basis quantized with each row's global range (as
    :func:`~twa_ray.core.quant.quantize` on the whole row), and the global relative error."""
    x = basis64.float()
    lo, hi = _block_range_rows(x)
    all_reduce_(lo, dist.ReduceOp.MIN, group)
    all_reduce_(hi, dist.ReduceOp.MAX, group)
    basis = None
    sq = torch.zeros(2, dtype=torch.float64)  # ||B - deq(B)||^2, ||B||^2
    if local.packed is not None:
        builder = PackedMatrixBuilder(x.shape[0], local.packed, bits, "row", lo=lo, hi=hi)
        for k in range(x.shape[0]):
            builder.set_row(k, x[k])
        basis = builder.finish()
        sq[0] = (basis64 - dequantize(basis).double()).square().sum()
        sq[1] = basis64.square().sum()
    sq = all_reduce_(sq, dist.ReduceOp.SUM, group)
    error = (sq[0] / sq[1]).sqrt() if sq[1] > 0 else torch.zeros((), dtype=torch.float64)
    return basis, error.reshape(1)


def _block_range_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of each row of ``x`` (R, n) as (R, 1); ``(+inf, -inf)`` when n = 0."""
    if x.shape[1] == 0:
        inf = torch.full((x.shape[0], 1), float("inf"))
        return inf, -inf
    lo, hi = x.aminmax(dim=1)
    return lo[:, None].clone(), hi[:, None].clone()

"""The TWA subspace: an origin and a (quantized) basis spanned by the candidates.

.. math::
    \\theta(\\alpha) = o + \\sum_{k=1}^{R} \\sum_{l=1}^{L} \\alpha_{k,l} B_{k,l}
    \\qquad (B_{k,l} \\text{ is zero outside block } l)

Two variants (Li et al., arXiv 2205.13104):

- **affine** (layer-wise, journal version): :math:`o = c = \\frac1K\\sum_k w_k` and
  :math:`B_{k,l} = (w_k - c)|_l / \\lVert (w_k - c)|_l \\rVert`; :math:`\\alpha = 0` is the SWA
  solution. Blocks whose delta has zero norm carry no direction (their row stays 0, never NaN).
- **span** (ICLR version): :math:`B` = an orthonormal basis of :math:`\\mathrm{span}\\{w_k - c\\}`
  (``center=True``, :math:`o = c`) or of :math:`\\mathrm{span}\\{w_k\\}` (:math:`o = 0`), from a
  float64 Householder QR; directions with :math:`|R_{ii}| \\le` ``rtol`` :math:`\\cdot \\max |R_{ii}|`
  are dropped (consecutive checkpoints are nearly collinear) and reported. L = 1. Centering is
  the default: the origin stays in float32 and only the deltas are quantized.
  :math:`\\alpha` starts at the SWA point.

Gradient descent on :math:`\\alpha` with gradient :math:`a_{k,l} = \\langle B_{k,l}, g \\rangle` is
the paper's projected SGD :math:`\\theta \\leftarrow \\theta - \\eta B^\\top B g` when B is orthonormal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from twa_ray.core.layout import Blocks, Layout
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import (
    PackedMatrix,
    PackedMatrixBuilder,
    dequantize,
    quantize,
    relative_error,
)

__all__ = ["Subspace", "build_affine", "build_span", "CandidateStream"]

CandidateStream = Callable[[], Iterable[torch.Tensor]]
"""A re-iterable source of flat ``(D,)`` candidates: called once per pass over the candidates."""


@dataclass
class Subspace:
    """Origin ``o`` (D,), packed basis ``B`` (R x D, L column blocks) and the SWA point ``alpha0``.

    Attributes:
        kind: "affine" or "span".
        blocks: the column partition (L blocks).
        origin: (D,) float32.
        basis: (R, D) packed, ``R = K`` (affine) or the kept rank (span).
        alpha0: (R, L) float32 coefficients of the SWA solution.
        num_candidates: K.
        dropped: span: indices of candidates whose direction was dropped (rank deficiency).
        zero_blocks: affine: (K, L) bool, blocks whose delta is zero (no direction).
        quant_error: (L,) float64 relative quantization error per block.
        points: (K, R, L) float32, the coefficients of each candidate: ``theta(points[k])`` is
            candidate k up to the basis quantization (affine: its block norms on row k; span:
            its QR coordinates).
    """

    kind: Literal["affine", "span"]
    blocks: Blocks
    origin: torch.Tensor
    basis: PackedMatrix
    alpha0: torch.Tensor
    num_candidates: int
    dropped: tuple[int, ...] = ()
    zero_blocks: torch.Tensor | None = None
    quant_error: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    points: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.basis.num_rows

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """``a[k, l] = <B[k, l], g>``: (D,) -> (R, L)."""
        return project(self.basis, g)

    def reconstruct(self, alpha: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``theta = o + sum alpha[k, l] B[k, l]``: (R, L) -> (D,)."""
        return reconstruct(self.basis, alpha, self.origin, out=out)

    def to(self, device: torch.device | str) -> Subspace:
        return replace(
            self,
            origin=self.origin.to(device),
            basis=self.basis.to(device),
            alpha0=self.alpha0.to(device),
            points=None if self.points is None else self.points.to(device),
        )


def _checked(stream: CandidateStream, numel: int) -> Iterator[torch.Tensor]:
    for k, w in enumerate(stream()):
        if w.dim() != 1 or w.numel() != numel:
            raise ValueError(
                f"candidate {k} has shape {list(w.shape)}, expected ({numel},); "
                "all candidates must come from the same model"
            )
        if not torch.isfinite(w).all():
            raise ValueError(
                f"candidate {k} holds NaN or Inf values; remove it (a diverged checkpoint) "
                "or re-save it"
            )
        yield w


def _mean(stream: CandidateStream, numel: int) -> tuple[torch.Tensor, int]:
    total = torch.zeros(numel, dtype=torch.float64)
    count = 0
    for w in _checked(stream, numel):
        total += w.double()
        count += 1
    if count < 2:
        raise ValueError(
            f"TWA needs at least 2 candidates, got {count}; sample more often "
            "(a smaller sample_interval) or add checkpoints to the store"
        )
    return total / count, count


def _block_norms(delta: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    return torch.stack([delta[a:b].norm() for a, b in zip(blocks.bounds, blocks.bounds[1:])])


def build_affine(
    candidates: CandidateStream,
    layout: Layout,
    *,
    blocks: Blocks,
    bits: int = 4,
    granularity: Literal["row", "block"] = "row",
) -> Subspace:
    """Affine layer-wise subspace from a stream of candidates, in bounded memory.

    Passes over the stream: (1) the mean c, (2) per-block norms of ``w_k - c`` (and the code
    range for ``granularity="block"``), (3) quantize each normalized row, (4) the quantization
    error. At no point are more than one candidate and a few D-vectors held in float; the
    packed basis is the only K x D object.
    """
    numel = layout.numel
    if blocks.numel != numel:
        raise ValueError(f"blocks cover {blocks.numel} coordinates, the layout has {numel}")
    center64, num = _mean(candidates, numel)
    center = center64.float()
    bounds = blocks.bounds
    norms = torch.empty(num, blocks.num_blocks, dtype=torch.float64)
    lo = torch.full((blocks.num_blocks,), float("inf"))
    hi = torch.full((blocks.num_blocks,), float("-inf"))
    for k, w in enumerate(_checked(candidates, numel)):
        delta = w.double() - center64
        norms[k] = _block_norms(delta, blocks)
        if granularity == "block":
            row = _normalized(delta.float(), norms[k], bounds)
            for idx, (a, b) in enumerate(zip(bounds, bounds[1:])):
                lo[idx] = torch.minimum(lo[idx], row[a:b].min())
                hi[idx] = torch.maximum(hi[idx], row[a:b].max())
    zero_blocks = norms == 0
    if bool(zero_blocks.all()):
        raise ValueError(
            "all candidates are identical: there is nothing to average; "
            "sample candidates from different steps or checkpoints"
        )
    ranges = {"lo": lo, "hi": hi} if granularity == "block" else {}
    builder = PackedMatrixBuilder(num, blocks, bits, granularity, **ranges)
    for k, w in enumerate(_checked(candidates, numel)):
        builder.set_row(k, _normalized(w.float() - center, norms[k], bounds))
    basis = builder.finish()
    err_sq = torch.zeros(blocks.num_blocks, dtype=torch.float64)
    ref_sq = torch.zeros(blocks.num_blocks, dtype=torch.float64)
    for k, w in enumerate(_checked(candidates, numel)):
        row = _normalized(w.float() - center, norms[k], bounds)
        approx = dequantize(_row(basis, k))[0]
        err_sq += _block_norms((row - approx).double(), blocks) ** 2
        ref_sq += _block_norms(row.double(), blocks) ** 2
    quant_error = torch.where(ref_sq > 0, (err_sq / ref_sq.clamp_min(1e-300)).sqrt(), 0.0)
    points = torch.zeros(num, num, blocks.num_blocks)
    points[torch.arange(num), torch.arange(num)] = norms.float()  # w_k = c + sum_l n_kl B_kl
    return Subspace(
        kind="affine",
        blocks=blocks,
        origin=center,
        basis=basis,
        alpha0=torch.zeros(num, blocks.num_blocks),
        num_candidates=num,
        zero_blocks=zero_blocks,
        quant_error=quant_error,
        points=points,
    )


def _normalized(delta: torch.Tensor, norms: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    """``delta`` divided block-wise by its norms; zero-norm blocks stay zero (no NaN)."""
    out = delta.clone()
    for idx, (a, b) in enumerate(zip(bounds, bounds[1:])):
        n = float(norms[idx])
        out[a:b] = out[a:b] / n if n > 0 else 0.0
    return out


def _row(pm: PackedMatrix, k: int) -> PackedMatrix:
    return replace(
        pm,
        num_rows=1,
        data=pm.data[k : k + 1],
        scale=pm.scale[k : k + 1],
        zero=pm.zero[k : k + 1],
    )


def build_span(
    candidates: CandidateStream,
    layout: Layout,
    *,
    bits: int = 4,
    center: bool = True,
    rtol: float = 1e-6,
) -> Subspace:
    """Span subspace (L = 1) by float64 Householder QR of the candidate matrix.

    Memory: the QR needs the K x D candidate matrix in float64 plus Q (2 · K · D · 8 bytes);
    use the affine variant when that does not fit.
    """
    numel = layout.numel
    rows = [w.double() for w in _checked(candidates, numel)]
    if len(rows) < 2:
        raise ValueError(
            f"TWA needs at least 2 candidates, got {len(rows)}; sample more often "
            "(a smaller sample_interval) or add checkpoints to the store"
        )
    mat = torch.stack(rows)  # (K, D) float64
    del rows
    mean = mat.mean(dim=0)
    if center:
        mat -= mean
    q, r = torch.linalg.qr(mat.T, mode="reduced")  # q: (D, K), r: (K, K)
    diag = r.diagonal().abs()
    keep = diag > rtol * diag.max() if diag.max() > 0 else torch.zeros_like(diag, dtype=torch.bool)
    if not bool(keep.any()):
        raise ValueError(
            "all candidates are identical: there is nothing to average; "
            "sample candidates from different steps or checkpoints"
        )
    basis64 = q[:, keep].T.contiguous()  # (R, D) orthonormal rows
    blocks = layout.blocks("model")
    basis = quantize(basis64.float(), blocks, bits)
    origin = mean.float() if center else torch.zeros(numel)
    alpha0 = torch.zeros(basis64.shape[0], 1) if center else (basis64 @ mean).float()[:, None]
    return Subspace(
        kind="span",
        blocks=blocks,
        origin=origin,
        basis=basis,
        alpha0=alpha0,
        num_candidates=mat.shape[0],
        dropped=tuple(int(i) for i in torch.nonzero(~keep).flatten()),
        quant_error=relative_error(basis64, basis),
        points=(mat @ basis64.T).float()[:, :, None],  # rows of mat: w_k - o
    )

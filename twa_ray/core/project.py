"""The two GEMVs of a TWA step, computed from the packed codes of B.

.. math::
    a[k, l] &= \\langle B[k, l], g \\rangle
             = \\mathrm{scale}[k, l] \\, \\langle q[k, l], g_l \\rangle
               + \\mathrm{zero}[k, l] \\textstyle\\sum_{j \\in l} g_j
             &&\\text{(project)} \\\\
    \\theta_j &= o_j + \\textstyle\\sum_k (\\alpha \\cdot \\mathrm{scale})[k, l] \\, q[k, j]
               + \\sum_k \\alpha[k, l] \\, \\mathrm{zero}[k, l], \\quad j \\in l
             &&\\text{(reconstruct)}

Both read B once and are memory-bandwidth bound: no float copy of B and no float temporary of
``R x block`` size is made. Paths, chosen from the device of ``g`` / ``alpha``:

- CPU, bits 1/2/4/8: the C kernels of ``kernels/packed.c`` (column tiles shared by
  ``torch.get_num_threads()`` threads of the library's own pool; built on first use, with the
  fastest path of this CPU -- portable / AVX2 / AVX-512 -- measured then; see
  :mod:`twa_ray.core.kernels.cpu`, whose ``kernel_info()`` reports it).
  ``TWA_RAY_KERNEL_PATH=<path>`` forces a path; ``TWA_RAY_NO_CKERNEL=1`` or a missing C compiler
  selects the pure-torch path.
- CUDA, bits 1/2/4/8: the Triton kernels of ``twa_ray.core.kernels.triton_packed`` when that
  module imports and reports ``available()`` (its ``project(pm, g)`` and
  ``reconstruct(pm, alpha, origin, out)`` have the semantics of this module's functions, inputs
  already validated); else the torch path.
- Pure torch (any device): column chunks of every block are unpacked to float32 and multiplied,
  temporaries bounded by ``_CHUNK`` elements.
- bits 16/32: the torch path; float32 chunks are views of B (no copy), bfloat16 chunks are
  converted one at a time.

The torch paths call BLAS per block and chunk, with a block's slice of ``g`` and its column of
coefficients copied to fresh contiguous vectors: the calls, their shapes, strides and alignment
are the same whether the block sits in a whole basis or in a shard, so are the bits on any CPU.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from twa_ray.core.kernels import cpu
from twa_ray.core.quant import PackedMatrix, packed_size, unpack

__all__ = ["project", "reconstruct"]

_CHUNK = 1 << 20  # elements of a float temporary in the torch paths (4 MiB)


def _check_vector(pm: PackedMatrix, v: torch.Tensor, name: str) -> None:
    if v.dtype != torch.float32 or tuple(v.shape) != (pm.numel,):
        raise ValueError(
            f"{name} must be a float32 vector of shape ({pm.numel},), got {v.dtype} {list(v.shape)}"
        )
    if v.device != pm.data.device:
        raise ValueError(
            f"{name} is on {v.device}, the packed matrix on {pm.data.device}; move one"
        )


def _use_ckernel() -> bool:
    return os.environ.get("TWA_RAY_NO_CKERNEL", "") in ("", "0")


@functools.cache
def _triton() -> ModuleType | None:
    """The Triton kernels when they import and can run here (called for CUDA tensors only)."""
    try:
        module = importlib.import_module("twa_ray.core.kernels.triton_packed")
    except ImportError:
        return None
    return module if module.available() else None


def _chunk_cols(pm: PackedMatrix) -> int:
    """Columns per torch chunk: bounded temporaries; a multiple of 8 keeps chunks byte-aligned."""
    return max(8, _CHUNK // pm.num_rows // 8 * 8)


def _fresh(v: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the vector ``v`` in a new allocation (aligned by the allocator).

    BLAS (MKL, OpenBLAS) picks its kernel and summation order by the stride and the address
    alignment of its operands (AVX-512 most of all): the torch paths hand it a block's slice of
    ``g`` and its column of coefficients through this copy, so that a block computes the same
    bits whatever tensor it is a slice of (a whole basis or a shard, :mod:`.placement`).
    """
    return torch.empty(v.shape, dtype=v.dtype, device=v.device).copy_(v)


def _chunks(pm: PackedMatrix, blk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(c0, c1, codes)`` for column chunks ``c0:c1`` of block ``blk``; ``codes`` float32
    ``(R, c1 - c0)`` (the scale / zero of the affine code are applied by the caller)."""
    a, b, byte0 = pm.bounds[blk], pm.bounds[blk + 1], pm.byte_bounds[blk]
    step = _chunk_cols(pm)
    for c0 in range(0, b - a, step):
        c1 = min(b - a, c0 + step)
        if pm.bits > 8:
            yield c0, c1, pm.data[:, a + c0 : a + c1].float()
        else:
            raw = pm.data[:, byte0 + c0 * pm.bits // 8 : byte0 + packed_size(c1, pm.bits)]
            yield c0, c1, unpack(raw, pm.bits, c1 - c0).float()


# ----------------------------------------------------------------------------- project


def project(pm: PackedMatrix, g: torch.Tensor) -> torch.Tensor:
    """``a[k, l] = <B[k, l], g>``: the gradient ``g`` ``(D,)`` projected on every row and block.

    Returns float32 ``(R, L)``.

    >>> from twa_ray.core.layout import Blocks
    >>> from twa_ray.core.quant import quantize
    >>> pm = quantize(torch.tensor([[1.0, 2.0, 3.0]]), Blocks((0, 1, 3), ("a", "b")), 8)
    >>> project(pm, torch.ones(3))
    tensor([[1., 5.]])
    """
    _check_vector(pm, g, "g")
    g = g.contiguous()
    if pm.bits <= 8 and g.is_cuda and (gpu := _triton()) is not None:
        return gpu.project(pm, g)
    lib = cpu.load() if pm.bits <= 8 and g.device.type == "cpu" and _use_ckernel() else None
    if lib is None:
        return _project_torch(pm, g)
    out = torch.empty(pm.num_rows, pm.num_blocks)
    cpu.project_(lib, pm, g, out)
    return out


def _project_torch(pm: PackedMatrix, g: torch.Tensor) -> torch.Tensor:
    dots = torch.zeros(pm.num_rows, pm.num_blocks, device=g.device)
    gsum = torch.empty(pm.num_blocks, device=g.device)
    for blk, (a, b) in enumerate(zip(pm.bounds, pm.bounds[1:])):
        g_blk = _fresh(g[a:b])
        for c0, c1, codes in _chunks(pm, blk):
            dots[:, blk] += codes @ g_blk[c0:c1]  # (R,)
        gsum[blk] = g_blk.sum()
    return pm.scale * dots + pm.zero * gsum


# ----------------------------------------------------------------------------- reconstruct


def reconstruct(
    pm: PackedMatrix,
    alpha: torch.Tensor,
    origin: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``theta = origin + sum_{k,l} alpha[k, l] B[k, l]`` as float32 ``(D,)``.

    Args:
        pm: the packed ``R x D`` matrix B.
        alpha: float32 ``(R, L)`` coefficients.
        origin: float32 ``(D,)``, or ``None`` for 0. May be ``out`` itself (in-place update).
        out: optional contiguous float32 ``(D,)`` written in place and returned.

    >>> from twa_ray.core.layout import Blocks
    >>> from twa_ray.core.quant import quantize
    >>> pm = quantize(torch.tensor([[1.0, 2.0, 3.0]]), Blocks((0, 3), ("w",)), 1)
    >>> reconstruct(pm, torch.tensor([[2.0]]), torch.ones(3))
    tensor([3., 3., 7.])
    """
    if alpha.dtype != torch.float32 or tuple(alpha.shape) != (pm.num_rows, pm.num_blocks):
        raise ValueError(
            f"alpha must be float32 of shape ({pm.num_rows}, {pm.num_blocks}), "
            f"got {alpha.dtype} {list(alpha.shape)}"
        )
    if alpha.device != pm.data.device:
        raise ValueError(f"alpha is on {alpha.device}, the packed matrix on {pm.data.device}")
    if origin is not None:
        _check_vector(pm, origin, "origin")
        origin = origin.contiguous()
    if out is None:
        out = torch.empty(pm.numel, device=alpha.device)
    else:
        _check_vector(pm, out, "out")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    alpha = alpha.contiguous()
    if pm.bits <= 8 and alpha.is_cuda and (gpu := _triton()) is not None:
        return gpu.reconstruct(pm, alpha, origin, out)
    lib = cpu.load() if pm.bits <= 8 and alpha.device.type == "cpu" and _use_ckernel() else None
    if lib is None:
        _reconstruct_torch(pm, alpha, origin, out)
    else:
        cpu.reconstruct_(lib, pm, alpha, origin, out)
    return out


def _reconstruct_torch(
    pm: PackedMatrix, alpha: torch.Tensor, origin: torch.Tensor | None, out: torch.Tensor
) -> None:
    for blk, a in enumerate(pm.bounds[:-1]):
        coef = _fresh(alpha[:, blk] * pm.scale[:, blk])  # (R,)
        bias = _fresh(alpha[:, blk] * pm.zero[:, blk]).sum()
        for c0, c1, codes in _chunks(pm, blk):
            val = codes.t() @ coef + bias  # (c1 - c0,)
            if origin is not None:
                val += origin[a + c0 : a + c1]  # read before out is written: origin may be out
            out[a + c0 : a + c1] = val

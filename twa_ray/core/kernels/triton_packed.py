"""Triton kernels for the packed low-bit B: the CUDA path of :mod:`twa_ray.core.project`.

B is an ``R x D`` matrix of b-bit codes (b = 1, 2, 4, 8) whose columns are cut into L blocks,
``B[k, j] ~= scale[k, l] q[k, j] + zero[k, l]`` for j in block l. Code j of block l sits in
byte ``byte_bounds[l] + (j - bounds[l]) // (8 // b)`` of row k of ``codes`` at bit offset
``((j - bounds[l]) % (8 // b)) * b``; every block starts byte-aligned.

.. math::
    a[k, l] &= \\mathrm{scale}[k, l] \\textstyle\\sum_{j \\in l} q[k, j] g_j
              + \\mathrm{zero}[k, l] \\sum_{j \\in l} g_j          &&\\text{(project)} \\\\
    \\theta_j &= o_j + \\textstyle\\sum_k (\\alpha \\cdot \\mathrm{scale})[k, l] \\, q[k, j]
              + \\sum_k \\alpha[k, l] \\, \\mathrm{zero}[k, l]     &&\\text{(reconstruct, } j \\in l)

Both directions stream B once (the step's floor is 2 x packed bytes / bandwidth); decoding
costs ~4-6 instructions per code, which at 4 bits is about the bandwidth of an H100 and
somewhat more than that of an H200 (fewer bits: more codes per byte, compute bound). So:

- One program per *tile*: ``tile_bytes`` consecutive bytes of one block, for all R rows (a loop
  over ``rows`` rows at a time). Every packed byte is read once, g / theta once per tile.
  A host table (cached per layout) maps program -> (block, first byte): one launch covers every
  block, a 64-element BN bias costs one small program, a 2M-element weight thousands.
- Tiles start on 16-byte boundaries of the row (the first tile of a block may start a few bytes
  before it; those bytes are read and their columns masked out). When the codes' base pointer
  and row stride are 16-byte aligned and the allocation extends to the next 16 bytes, the loads
  carry no per-byte mask and compile to vector loads (``vec`` bytes per thread); otherwise
  a masked, unvectorized path runs (same results). :func:`twa_ray.core.quant.pad_rows` (called
  by ``PackedMatrix.to`` on CUDA) gives the fast path's layout.
- No int -> float conversions (quarter rate on the GPU): ``(byte & mask_s) | 0x4B000000`` is
  the float32 ``2**23 + q * 2**(s*b)`` exactly (s = the code's slot in its byte), so one
  subtraction gives ``q * 2**(s*b)`` exactly; the slot factor ``2**-(s*b)`` is folded into g
  (project) or into the column sum (reconstruct). All accumulation is float32.
- project is split-K: each tile adds ``scale * <q, g>_tile + zero * sum(g_tile)`` into
  ``a[k, l]`` with a relaxed float32 atomic (the summation order, hence the last bits, vary
  from run to run). reconstruct owns its columns: no atomics, deterministic.

This module imports only torch, triton and ``twa_ray.core.quant`` (for ``ROW_ALIGN``); without
triton it still imports and :func:`available` is False.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import torch

from twa_ray.core.checks import Range, check_fields
from twa_ray.core.quant import ROW_ALIGN

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # CPU-only installs: the module still imports, available() is False
    _HAS_TRITON = False

__all__ = [
    "PACKED_BITS",
    "KernelConfig",
    "available",
    "default_config",
    "project",
    "project_triton",
    "reconstruct",
    "reconstruct_triton",
    "tile_table",
]

PACKED_BITS = (1, 2, 4, 8)
_ALIGN = ROW_ALIGN  # bytes: tile starts, row stride and base pointer of the vector-load path
_MAX_INT32 = 2**31 - 1


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of both kernels.

    Attributes:
        tile_bytes: bytes of one block's row segment per program (power of 2, >= 16).
        rows: rows loaded per loop iteration (power of 2).
        vec: bytes per thread load on the aligned path (1, 2, 4, 8 or 16; <= tile_bytes).
            With ``rows * tile_bytes / vec == 32 * num_warps`` every thread loads one vector
            of one row per iteration.
        num_warps: warps per program.
    """

    tile_bytes: Annotated[int, Range(ge=_ALIGN)] = 256
    rows: Annotated[int, Range(ge=1)] = 8
    vec: Literal[1, 2, 4, 8, 16] = 16
    num_warps: Literal[1, 2, 4, 8, 16] = 4

    def __post_init__(self) -> None:
        not_pow2 = [
            f"{name}={n}: must be a power of 2"
            for name, n in (("tile_bytes", self.tile_bytes), ("rows", self.rows))
            if n >= 1 and n & (n - 1)
        ]
        check_fields(self, "kernel config", not_pow2)  # the bounds and choices declared above


# Per (kernel, bits): 4 warps, each thread loads one vector of one row per iteration
# (rows * tile_bytes / vec = 128 threads), i.e. 32 codes of b < 8 (16 at b = 8).
_DEFAULTS = {
    (kernel, bits): cfg
    for kernel in ("project", "reconstruct")
    for bits, cfg in (
        (8, KernelConfig(tile_bytes=256, rows=8, vec=16)),
        (4, KernelConfig(tile_bytes=256, rows=8, vec=16)),
        (2, KernelConfig(tile_bytes=128, rows=8, vec=8)),
        (1, KernelConfig(tile_bytes=64, rows=8, vec=4)),
    )
}


def default_config(bits: int, kernel: str = "project") -> KernelConfig:
    """The launch shape used when none is given (``kernel``: "project" or "reconstruct")."""
    _check_bits(bits)
    if kernel not in ("project", "reconstruct"):
        raise ValueError(f"kernel={kernel!r}: use 'project' or 'reconstruct'")
    return _DEFAULTS[kernel, bits]


def _check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise ValueError(
            f"bits={bits!r}: the triton kernels take packed codes of 1, 2, 4 or 8 bits"
        )


def _interpreted() -> bool:
    """True when triton (and our kernels) were set up by the CPU interpreter."""
    return _HAS_TRITON and type(tl.zeros).__name__ == "InterpretedFunction"


def available() -> bool:
    """Whether the kernels can run here: triton imports, and a CUDA device is present or the
    triton interpreter is on (``TRITON_INTERPRET=1`` set before triton was first imported,
    and still set; it then runs on CPU tensors)."""
    if not _HAS_TRITON:
        return False
    if _interpreted():
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- tile table


def tile_table(
    byte_bounds: Sequence[int], tile_bytes: int, align: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles covering every block's bytes: ``(tile_block, tile_byte)`` int32 CPU tensors.

    Block l (bytes ``byte_bounds[l]:byte_bounds[l+1]``) gets tiles starting at
    ``floor(byte_bounds[l] / align) * align + i * tile_bytes``; empty blocks get none.
    """
    bb = torch.as_tensor(list(byte_bounds), dtype=torch.int64)
    first, end = bb[:-1], bb[1:]
    start = first - first % align
    count = torch.where(end > first, (end - start + tile_bytes - 1) // tile_bytes, 0)
    blocks = torch.repeat_interleave(torch.arange(len(first)), count)
    offset = torch.cumsum(count, 0) - count  # first tile of each block
    index = torch.arange(len(blocks)) - offset[blocks]
    tile_byte = start[blocks] + index * tile_bytes
    return blocks.to(torch.int32), tile_byte.to(torch.int32)


@dataclass(frozen=True)
class _Tables:
    tile_block: torch.Tensor  # (T,) int32
    tile_byte: torch.Tensor  # (T,) int32
    bounds: torch.Tensor  # (L + 1,) int32
    byte_bounds: torch.Tensor  # (L + 1,) int32

    @property
    def num_tiles(self) -> int:
        return self.tile_block.numel()


_TABLES: dict[tuple[Any, ...], _Tables] = {}
_TABLES_MAX = 64


def _tables(
    bounds: tuple[int, ...],
    byte_bounds: tuple[int, ...],
    bits: int,
    tile_bytes: int,
    align: int,
    device: torch.device,
) -> _Tables:
    key = (bounds, byte_bounds, bits, tile_bytes, align, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    # validated once per layout, never in the hot loop
    if len(bounds) != len(byte_bounds) or len(bounds) < 2 or bounds[0] != 0 or byte_bounds[0] != 0:
        raise ValueError(
            f"bounds and byte_bounds must both start at 0 and have L + 1 >= 2 entries, "
            f"got {len(bounds)} and {len(byte_bounds)}"
        )
    for i in range(len(bounds) - 1):
        n, nb = bounds[i + 1] - bounds[i], byte_bounds[i + 1] - byte_bounds[i]
        if n < 0 or nb != -(-n * bits // 8):
            raise ValueError(
                f"block {i}: {n} codes of {bits} bits need {-(-n * bits // 8)} bytes, "
                f"byte_bounds give {nb}"
            )
    if bounds[-1] > _MAX_INT32 or byte_bounds[-1] + 2 * tile_bytes > _MAX_INT32:
        raise ValueError(f"D={bounds[-1]} too large for the int32 indexing of the triton kernels")
    tile_block, tile_byte = tile_table(byte_bounds, tile_bytes, align)
    tables = _Tables(
        tile_block=tile_block.to(device),
        tile_byte=tile_byte.to(device),
        bounds=torch.tensor(bounds, dtype=torch.int32, device=device),
        byte_bounds=torch.tensor(byte_bounds, dtype=torch.int32, device=device),
    )
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = tables
    return tables


def _row_layout(codes: torch.Tensor) -> tuple[bool, int, int]:
    """``(aligned, row_stride, row_limit)`` of the codes (see the module docstring)."""
    num_rows, nbytes = codes.shape
    row_limit = -(-nbytes // _ALIGN) * _ALIGN
    stride = codes.stride(0) if num_rows > 1 else row_limit
    reachable = codes.untyped_storage().nbytes() - codes.storage_offset()
    aligned = bool(
        codes.data_ptr() % _ALIGN == 0
        and stride % _ALIGN == 0
        and reachable >= (num_rows - 1) * stride + row_limit
    )
    return aligned, stride, row_limit


def _check_common(
    codes: torch.Tensor,
    bits: int,
    bounds: Sequence[int],
    byte_bounds: Sequence[int],
    scale: torch.Tensor,
    zero: torch.Tensor,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    _check_bits(bits)
    if not _HAS_TRITON:
        raise RuntimeError("triton is not installed; use twa_ray.core.project (torch/C paths)")
    if (
        codes.dtype != torch.uint8
        or codes.dim() != 2
        or (codes.shape[1] > 1 and codes.stride(1) != 1)
    ):
        raise ValueError(
            f"codes must be uint8 (R, nbytes) with unit column stride, got {codes.dtype} "
            f"{list(codes.shape)} strides {codes.stride()}"
        )
    bounds_t = bounds if isinstance(bounds, tuple) else tuple(int(b) for b in bounds)
    byte_bounds_t = (
        byte_bounds if isinstance(byte_bounds, tuple) else tuple(int(b) for b in byte_bounds)
    )
    shape = (codes.shape[0], len(bounds_t) - 1)
    if codes.shape[1] != byte_bounds_t[-1]:
        raise ValueError(
            f"codes have {codes.shape[1]} bytes per row, byte_bounds end at {byte_bounds_t[-1]}"
        )
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dtype != torch.float32 or tuple(t.shape) != shape or t.device != codes.device:
            raise ValueError(
                f"{name} must be float32 {list(shape)} on {codes.device}, "
                f"got {t.dtype} {list(t.shape)} on {t.device}"
            )
    return bounds_t, byte_bounds_t


def _check_vector(v: torch.Tensor, name: str, numel: int, device: torch.device) -> None:
    if v.dim() != 1 or v.numel() != numel or v.device != device or not v.is_floating_point():
        raise ValueError(
            f"{name} must be a floating ({numel},) vector on {device}, "
            f"got {v.dtype} {list(v.shape)} on {v.device}"
        )


# ----------------------------------------------------------------------------- API


def project_triton(
    codes: torch.Tensor,
    bits: int,
    bounds: Sequence[int],
    byte_bounds: Sequence[int],
    scale: torch.Tensor,
    zero: torch.Tensor,
    g: torch.Tensor,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``a[k, l] = scale[k, l] <q[k, l], g_l> + zero[k, l] sum(g_l)``, float32 ``(R, L)``.

    Args:
        codes: uint8 ``(R, nbytes)`` packed codes (unit column stride; any row stride).
        bits: 1, 2, 4 or 8.
        bounds, byte_bounds: L + 1 column / byte offsets of the blocks.
        scale, zero: float32 ``(R, L)``.
        g: ``(D,)`` float32, bfloat16 or float16 (accumulated in float32).
        config: launch shape (default: :func:`default_config`).
    """
    bounds_t, byte_bounds_t = _check_common(codes, bits, bounds, byte_bounds, scale, zero)
    _check_vector(g, "g", bounds_t[-1], codes.device)
    cfg = config or _DEFAULTS["project", bits]
    aligned, row_stride, row_limit = _row_layout(codes)
    tables = _tables(
        bounds_t, byte_bounds_t, bits, cfg.tile_bytes, _ALIGN if aligned else 1, codes.device
    )
    num_rows, num_blocks = codes.shape[0], len(bounds_t) - 1
    out = torch.zeros(num_rows, num_blocks, dtype=torch.float32, device=codes.device)
    if tables.num_tiles == 0 or num_rows == 0:
        return out
    _project_kernel[(tables.num_tiles,)](
        codes,
        g.contiguous(),
        scale.contiguous(),
        zero.contiguous(),
        out,
        tables.tile_block,
        tables.tile_byte,
        tables.bounds,
        tables.byte_bounds,
        num_rows,
        num_blocks,
        row_stride,
        cfg.rows * row_stride,
        row_limit,
        BITS=bits,
        TILE=cfg.tile_bytes,
        ROWS=cfg.rows,
        VEC=cfg.vec if aligned else 1,
        ALIGNED=aligned,
        num_warps=cfg.num_warps,
    )
    return out


def reconstruct_triton(
    codes: torch.Tensor,
    bits: int,
    bounds: Sequence[int],
    byte_bounds: Sequence[int],
    scale: torch.Tensor,
    zero: torch.Tensor,
    alpha: torch.Tensor,
    origin: torch.Tensor | None,
    out: torch.Tensor | None = None,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``theta = origin + sum_{k,l} alpha[k, l] B[k, l]``, float32 ``(D,)``.

    Args:
        codes, bits, bounds, byte_bounds, scale, zero: the packed B (see :func:`project_triton`).
        alpha: float32 ``(R, L)``.
        origin: float32 ``(D,)`` or ``None`` (zero). May be ``out`` itself.
        out: contiguous float32 ``(D,)`` written and returned (allocated when ``None``).
        config: launch shape (default: :func:`default_config`).
    """
    bounds_t, byte_bounds_t = _check_common(codes, bits, bounds, byte_bounds, scale, zero)
    num_rows, num_blocks, numel = codes.shape[0], len(bounds_t) - 1, bounds_t[-1]
    if alpha.dtype != torch.float32 or tuple(alpha.shape) != (num_rows, num_blocks):
        raise ValueError(
            f"alpha must be float32 ({num_rows}, {num_blocks}), got {alpha.dtype} {list(alpha.shape)}"
        )
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    _check_vector(out, "out", numel, codes.device)
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 vector")
    if origin is not None:
        _check_vector(origin, "origin", numel, codes.device)
        origin = origin.float().contiguous()
    cfg = config or _DEFAULTS["reconstruct", bits]
    aligned, row_stride, row_limit = _row_layout(codes)
    tables = _tables(
        bounds_t, byte_bounds_t, bits, cfg.tile_bytes, _ALIGN if aligned else 1, codes.device
    )
    if tables.num_tiles == 0:
        return out
    _reconstruct_kernel[(tables.num_tiles,)](
        codes,
        alpha.contiguous(),
        scale.contiguous(),
        zero.contiguous(),
        origin if origin is not None else out,
        out,
        tables.tile_block,
        tables.tile_byte,
        tables.bounds,
        tables.byte_bounds,
        num_rows,
        num_blocks,
        row_stride,
        cfg.rows * row_stride,
        row_limit,
        BITS=bits,
        TILE=cfg.tile_bytes,
        ROWS=cfg.rows,
        VEC=cfg.vec if aligned else 1,
        ALIGNED=aligned,
        HAS_ORIGIN=origin is not None,
        num_warps=cfg.num_warps,
    )
    return out


class _Packed(Protocol):
    """The fields of :class:`twa_ray.core.quant.PackedMatrix` the kernels read."""

    bits: int
    bounds: tuple[int, ...]
    byte_bounds: tuple[int, ...]
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def project(pm: _Packed, g: torch.Tensor) -> torch.Tensor:
    """:func:`project_triton` on a ``PackedMatrix`` (the dispatch target of core/project.py)."""
    return project_triton(pm.data, pm.bits, pm.bounds, pm.byte_bounds, pm.scale, pm.zero, g)


def reconstruct(
    pm: _Packed,
    alpha: torch.Tensor,
    origin: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`reconstruct_triton` on a ``PackedMatrix`` (the dispatch target of core/project.py)."""
    return reconstruct_triton(
        pm.data, pm.bits, pm.bounds, pm.byte_bounds, pm.scale, pm.zero, alpha, origin, out
    )


# ----------------------------------------------------------------------------- kernels

if _HAS_TRITON:

    @triton.jit
    def _plane(xm, S: tl.constexpr, BITS: tl.constexpr):
        """Codes in slot S of ``xm = byte | 0x4B000000`` (int32) as exact float32 ``q * 2**(S*BITS)``.

        ``xm & (mask_S | 0x4B000000)`` are the float bits of ``2**23 + q * 2**(S*BITS)``: one
        logic op per code (the OR is shared by the byte's codes), one exact subtraction.
        """
        f = xm & ((((1 << BITS) - 1) << (S * BITS)) | 0x4B000000)
        return f.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _g_plane(g_ptr, col, S: tl.constexpr, in_block, c1):
        j = col + S
        return tl.load(g_ptr + j, mask=in_block & (j < c1), other=0.0).to(tl.float32)

    @triton.jit
    def _store_plane(
        out_ptr,
        origin_ptr,
        col,
        S: tl.constexpr,
        BITS: tl.constexpr,
        colsum,
        c,
        in_block,
        c1,
        HAS_ORIGIN: tl.constexpr,
    ):
        j = col + S
        m = in_block & (j < c1)
        val = colsum * (1.0 / (1 << (S * BITS))) + c
        if HAS_ORIGIN:
            val = tl.load(origin_ptr + j, mask=m, other=0.0) + val
        tl.store(out_ptr + j, val, mask=m)

    @triton.jit
    def _tile(
        codes_ptr,
        tile_block_ptr,
        tile_byte_ptr,
        bounds_ptr,
        byte_bounds_ptr,
        row_stride,
        row_limit,
        BITS: tl.constexpr,
        TILE: tl.constexpr,
        ROWS: tl.constexpr,
        VEC: tl.constexpr,
        ALIGNED: tl.constexpr,
    ):
        """This program's block, its first column per byte, and the pointers of rows 0..ROWS-1."""
        pid = tl.program_id(0)
        blk = tl.load(tile_block_ptr + pid)
        byte0 = tl.load(tile_byte_ptr + pid)
        if ALIGNED:
            byte0 = tl.multiple_of(byte0, VEC)
        c0 = tl.load(bounds_ptr + blk)
        c1 = tl.load(bounds_ptr + blk + 1)
        bb0 = tl.load(byte_bounds_ptr + blk)
        bb1 = tl.load(byte_bounds_ptr + blk + 1)
        offs = byte0 + tl.arange(0, TILE)  # (TILE,) byte index in the row
        in_block = (offs >= bb0) & (offs < bb1)
        if ALIGNED:  # whole VEC-byte groups: other blocks' bytes are read, their columns masked
            byte_ok = offs < row_limit
        else:
            byte_ok = in_block
        col = c0 + (offs - bb0) * (8 // BITS)  # column of slot 0 of each byte
        rows = tl.arange(0, ROWS)
        ptrs = codes_ptr + rows.to(tl.int64)[:, None] * row_stride + offs[None, :]  # (ROWS, TILE)
        return blk, c1, in_block, byte_ok, col, ptrs

    @triton.jit
    def _project_kernel(
        codes_ptr,
        g_ptr,
        scale_ptr,
        zero_ptr,
        out_ptr,
        tile_block_ptr,
        tile_byte_ptr,
        bounds_ptr,
        byte_bounds_ptr,
        num_rows,
        num_blocks,
        row_stride,
        row_step,
        row_limit,
        BITS: tl.constexpr,
        TILE: tl.constexpr,
        ROWS: tl.constexpr,
        VEC: tl.constexpr,
        ALIGNED: tl.constexpr,
    ):
        blk, c1, in_block, byte_ok, col, ptrs = _tile(
            codes_ptr,
            tile_block_ptr,
            tile_byte_ptr,
            bounds_ptr,
            byte_bounds_ptr,
            row_stride,
            row_limit,
            BITS,
            TILE,
            ROWS,
            VEC,
            ALIGNED,
        )
        # g of this tile, one (TILE,) plane per slot, scaled by 2**-(S*BITS) to undo _plane's
        # factor; gsum (for the zero-point term) from the unscaled values.
        g0 = _g_plane(g_ptr, col, 0, in_block, c1)
        gsum = tl.sum(g0, axis=0)
        if BITS < 8:  # 2+ codes per byte
            g1 = _g_plane(g_ptr, col, 1, in_block, c1)
            gsum += tl.sum(g1, axis=0)
            g1 = g1 * (1.0 / (1 << BITS))
        if BITS < 4:  # 4+
            g2 = _g_plane(g_ptr, col, 2, in_block, c1)
            g3 = _g_plane(g_ptr, col, 3, in_block, c1)
            gsum += tl.sum(g2, axis=0) + tl.sum(g3, axis=0)
            g2 = g2 * (1.0 / (1 << (2 * BITS)))
            g3 = g3 * (1.0 / (1 << (3 * BITS)))
        if BITS < 2:  # 8
            g4 = _g_plane(g_ptr, col, 4, in_block, c1)
            g5 = _g_plane(g_ptr, col, 5, in_block, c1)
            g6 = _g_plane(g_ptr, col, 6, in_block, c1)
            g7 = _g_plane(g_ptr, col, 7, in_block, c1)
            gsum += (
                tl.sum(g4, axis=0) + tl.sum(g5, axis=0) + tl.sum(g6, axis=0) + tl.sum(g7, axis=0)
            )
            g4 = g4 * (1.0 / (1 << (4 * BITS)))
            g5 = g5 * (1.0 / (1 << (5 * BITS)))
            g6 = g6 * (1.0 / (1 << (6 * BITS)))
            g7 = g7 * (1.0 / (1 << (7 * BITS)))
        rows0 = tl.arange(0, ROWS)
        x = tl.load(ptrs, mask=(rows0 < num_rows)[:, None] & byte_ok[None, :], other=0)
        for r0 in range(0, num_rows, ROWS):
            rows = r0 + rows0
            rmask = rows < num_rows
            idx = rows * num_blocks + blk
            s = tl.load(scale_ptr + idx, mask=rmask, other=0.0)
            z = tl.load(zero_ptr + idx, mask=rmask, other=0.0)
            # prefetch the next rows' bytes (masked off past the last row) before using these
            ptrs += row_step  # ROWS * row_stride (int64 when large)
            x_next = tl.load(
                ptrs, mask=(rows + ROWS < num_rows)[:, None] & byte_ok[None, :], other=0
            )
            xm = x.to(tl.int32) | 0x4B000000
            t = _plane(xm, 0, BITS) * g0[None, :]  # (ROWS, TILE)
            if BITS < 8:  # 2+ codes per byte
                t += _plane(xm, 1, BITS) * g1[None, :]
            if BITS < 4:  # 4+
                t += _plane(xm, 2, BITS) * g2[None, :]
                t += _plane(xm, 3, BITS) * g3[None, :]
            if BITS < 2:  # 8
                t += _plane(xm, 4, BITS) * g4[None, :]
                t += _plane(xm, 5, BITS) * g5[None, :]
                t += _plane(xm, 6, BITS) * g6[None, :]
                t += _plane(xm, 7, BITS) * g7[None, :]
            dot = tl.sum(t, axis=1)  # (ROWS,)
            tl.atomic_add(out_ptr + idx, s * dot + z * gsum, mask=rmask, sem="relaxed")
            x = x_next

    @triton.jit
    def _reconstruct_kernel(
        codes_ptr,
        alpha_ptr,
        scale_ptr,
        zero_ptr,
        origin_ptr,
        out_ptr,
        tile_block_ptr,
        tile_byte_ptr,
        bounds_ptr,
        byte_bounds_ptr,
        num_rows,
        num_blocks,
        row_stride,
        row_step,
        row_limit,
        BITS: tl.constexpr,
        TILE: tl.constexpr,
        ROWS: tl.constexpr,
        VEC: tl.constexpr,
        ALIGNED: tl.constexpr,
        HAS_ORIGIN: tl.constexpr,
    ):
        blk, c1, in_block, byte_ok, col, ptrs = _tile(
            codes_ptr,
            tile_block_ptr,
            tile_byte_ptr,
            bounds_ptr,
            byte_bounds_ptr,
            row_stride,
            row_limit,
            BITS,
            TILE,
            ROWS,
            VEC,
            ALIGNED,
        )
        # per-thread partial sums over rows, one (ROWS, TILE) plane per slot, reduced once at
        # the end (a reduction across rows every iteration would cross warps)
        acc0 = tl.zeros((ROWS, TILE), tl.float32)
        acc1 = tl.zeros((ROWS, TILE), tl.float32)
        acc2 = tl.zeros((ROWS, TILE), tl.float32)
        acc3 = tl.zeros((ROWS, TILE), tl.float32)
        acc4 = tl.zeros((ROWS, TILE), tl.float32)
        acc5 = tl.zeros((ROWS, TILE), tl.float32)
        acc6 = tl.zeros((ROWS, TILE), tl.float32)
        acc7 = tl.zeros((ROWS, TILE), tl.float32)
        cvec = tl.zeros((ROWS,), tl.float32)  # sum_k alpha * zero, reduced at the end
        rows = tl.arange(0, ROWS)
        rmask = rows < num_rows
        x = tl.load(ptrs, mask=rmask[:, None] & byte_ok[None, :], other=0)
        idx = rows * num_blocks + blk
        a = tl.load(alpha_ptr + idx, mask=rmask, other=0.0)
        s = tl.load(scale_ptr + idx, mask=rmask, other=0.0)
        z = tl.load(zero_ptr + idx, mask=rmask, other=0.0)
        for _ in range(0, num_rows, ROWS):
            # prefetch the next rows (masked off past the last row) before using these
            rows += ROWS
            rmask = rows < num_rows
            ptrs += row_step  # ROWS * row_stride (int64 when large)
            x_next = tl.load(ptrs, mask=rmask[:, None] & byte_ok[None, :], other=0)
            idx = rows * num_blocks + blk
            a_next = tl.load(alpha_ptr + idx, mask=rmask, other=0.0)
            s_next = tl.load(scale_ptr + idx, mask=rmask, other=0.0)
            z_next = tl.load(zero_ptr + idx, mask=rmask, other=0.0)
            xm = x.to(tl.int32) | 0x4B000000
            w = (a * s)[:, None]  # (ROWS, 1)
            cvec += a * z
            acc0 += _plane(xm, 0, BITS) * w
            if BITS < 8:  # 2+ codes per byte
                acc1 += _plane(xm, 1, BITS) * w
            if BITS < 4:  # 4+
                acc2 += _plane(xm, 2, BITS) * w
                acc3 += _plane(xm, 3, BITS) * w
            if BITS < 2:  # 8
                acc4 += _plane(xm, 4, BITS) * w
                acc5 += _plane(xm, 5, BITS) * w
                acc6 += _plane(xm, 6, BITS) * w
                acc7 += _plane(xm, 7, BITS) * w
            x, a, s, z = x_next, a_next, s_next, z_next
        c = tl.sum(cvec, axis=0)
        _store_plane(
            out_ptr, origin_ptr, col, 0, BITS, tl.sum(acc0, axis=0), c, in_block, c1, HAS_ORIGIN
        )
        if BITS < 8:  # 2+ codes per byte
            _store_plane(
                out_ptr, origin_ptr, col, 1, BITS, tl.sum(acc1, axis=0), c, in_block, c1, HAS_ORIGIN
            )
        if BITS < 4:  # 4+
            _store_plane(
                out_ptr, origin_ptr, col, 2, BITS, tl.sum(acc2, axis=0), c, in_block, c1, HAS_ORIGIN
            )
            _store_plane(
                out_ptr, origin_ptr, col, 3, BITS, tl.sum(acc3, axis=0), c, in_block, c1, HAS_ORIGIN
            )
        if BITS < 2:  # 8
            _store_plane(
                out_ptr, origin_ptr, col, 4, BITS, tl.sum(acc4, axis=0), c, in_block, c1, HAS_ORIGIN
            )
            _store_plane(
                out_ptr, origin_ptr, col, 5, BITS, tl.sum(acc5, axis=0), c, in_block, c1, HAS_ORIGIN
            )
            _store_plane(
                out_ptr, origin_ptr, col, 6, BITS, tl.sum(acc6, axis=0), c, in_block, c1, HAS_ORIGIN
            )
            _store_plane(
                out_ptr, origin_ptr, col, 7, BITS, tl.sum(acc7, axis=0), c, in_block, c1, HAS_ORIGIN
            )

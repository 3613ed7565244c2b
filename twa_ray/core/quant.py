"""Low-bit affine codes for the projection matrix B, packed 8/b codes per byte.

Each block l of a row k of B is stored as b-bit codes q and two float32 numbers:

.. math::
    B[k, j] \\approx \\mathrm{scale}[k, l] \\cdot q[k, j] + \\mathrm{zero}[k, l],
    \\qquad q \\in \\{0, \\dots, 2^b - 1\\},\\; j \\in \\text{block } l,

with ``zero = min`` and ``scale = (max - min) / (2^b - 1)`` taken per (row, block)
(``granularity="row"``) or per block over all rows (``"block"``). A constant block gets
``scale = 0`` and dequantizes exactly to ``zero``. ``bits=16`` keeps B in bfloat16 and
``bits=32`` in float32 (``scale = 1``, ``zero = 0``).

Packing: code j of a row sits in byte ``j // (8 // b)`` at bit offset ``(j % (8 // b)) * b``.
Every block starts on a byte boundary, so a block (or a range of blocks) is a plain column
slice of the packed bytes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from twa_ray.core.layout import Blocks, ColumnBlocks

__all__ = [
    "ALLOWED_BITS",
    "PackedMatrix",
    "PackedMatrixBuilder",
    "dequantize",
    "pack",
    "pad_rows",
    "quantize",
    "relative_error",
    "resolve_device",
    "rows_aligned",
    "unpack",
]

ALLOWED_BITS = (1, 2, 4, 8, 16, 32)
PACKED_BITS = (1, 2, 4, 8)
Granularity = Literal["row", "block"]

_CHUNK = 1 << 22  # elements of float temporaries per chunk when quantizing a whole matrix


def _check_bits(bits: int, allowed: tuple[int, ...] = ALLOWED_BITS) -> None:
    if bits not in allowed:
        raise ValueError(
            f"bits={bits!r} is not supported; use one of {', '.join(map(str, allowed))}"
        )


def _check_granularity(granularity: str) -> None:
    if granularity not in ("row", "block"):
        raise ValueError(f"granularity={granularity!r} is not supported; use 'row' or 'block'")


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf; quantize finite values only")


def packed_size(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    return -(-n * bits // 8)


def _byte_bounds(bounds: tuple[int, ...], bits: int) -> tuple[int, ...]:
    if bits > 8:
        return bounds
    out = [0]
    for a, b in zip(bounds, bounds[1:]):
        out.append(out[-1] + packed_size(b - a, bits))
    return tuple(out)


# ----------------------------------------------------------------------------- packing


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    n = q.shape[-1]
    nbytes = packed_size(n, bits)
    if bits == 8:
        return q.contiguous()
    if nbytes * per != n:
        q = torch.nn.functional.pad(q, (0, nbytes * per - n))
    q = q.reshape(*q.shape[:-1], nbytes, per)  # (..., nbytes, 8/b)
    out = q[..., 0].clone()
    for s in range(1, per):
        out |= q[..., s] << (s * bits)
    return out


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack b-bit codes ``q`` (uint8, ``(..., n)``, values < 2**bits) into ``(..., ceil(n*b/8))`` bytes.

    >>> pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 4)
    tensor([33,  3], dtype=torch.uint8)
    """
    _check_bits(bits, PACKED_BITS)
    if q.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {q.dtype}")
    if q.numel() and int(q.max()) >= 1 << bits:
        raise ValueError(f"codes must be < 2**bits = {1 << bits}, got {int(q.max())}")
    return _pack(q, bits)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., nbytes)`` bytes -> ``(..., n)`` uint8 codes."""
    _check_bits(bits, PACKED_BITS)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(
            f"n={n} codes of {bits} bits need {packed_size(n, bits)} bytes, got {packed.shape[-1]}"
        )
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., nbytes, 8/b)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]


# ----------------------------------------------------------------------------- the matrix

ROW_ALIGN = 16
"""Bytes: packed rows of B on the GPU start on this boundary (vector loads of the kernels)."""


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:<current>``): comparable to a tensor's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def rows_aligned(data: torch.Tensor) -> bool:
    """Rows of the 2-D ``data`` start on :data:`ROW_ALIGN`-byte boundaries and the storage
    reaches the padded end of the last row."""
    num_rows, nbytes = data.shape
    padded = -(-nbytes // ROW_ALIGN) * ROW_ALIGN
    stride = data.stride(0) if num_rows > 1 else padded
    reachable = data.untyped_storage().nbytes() - data.storage_offset() * data.element_size()
    return bool(
        data.data_ptr() % ROW_ALIGN == 0
        and stride % ROW_ALIGN == 0
        and reachable >= (num_rows - 1) * stride + padded
    )


def pad_rows(data: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A copy of the uint8 ``(R, nbytes)`` ``data`` on ``device`` whose rows start on 16-byte
    boundaries: an ``(R, nbytes)`` view of ``(R, ceil(nbytes / 16) * 16)`` storage.

    The one padding function of twa_ray (:meth:`PackedMatrix.to` calls it once per move).

    >>> pad_rows(torch.zeros(3, 5, dtype=torch.uint8)).stride()
    (16, 1)
    """
    num_rows, nbytes = data.shape
    storage = torch.empty(
        num_rows,
        -(-nbytes // ROW_ALIGN) * ROW_ALIGN,
        dtype=data.dtype,
        device=device or data.device,
    )
    out = storage[:, :nbytes]
    out.copy_(data)
    return out


@dataclass(frozen=True, eq=False)
class PackedMatrix(ColumnBlocks):
    """A quantized ``R x D`` matrix whose columns are cut into L blocks.

    Attributes:
        bits: bits per code (1, 2, 4, 8), or 16 (bfloat16) / 32 (float32) for unquantized.
        num_rows: R.
        bounds: L + 1 column offsets of the blocks.
        data: bits <= 8: uint8 ``(R, nbytes)``, block l's codes in bytes
            ``byte_bounds[l]:byte_bounds[l+1]``; bits 16/32: bfloat16/float32 ``(R, D)``.
        byte_bounds: L + 1 offsets of the blocks in ``data``'s columns (``bounds`` for 16/32).
        scale, zero: float32 ``(R, L)``: ``B[k, j] ~= scale[k, l] * q[k, j] + zero[k, l]``.
    """

    bits: int
    num_rows: int
    bounds: tuple[int, ...]
    data: torch.Tensor
    byte_bounds: tuple[int, ...]
    scale: torch.Tensor
    zero: torch.Tensor

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        num_blocks = len(self.bounds) - 1
        dtype = {16: torch.bfloat16, 32: torch.float32}.get(self.bits, torch.uint8)
        if self.bounds[0] != 0 or any(b <= a for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"bounds must start at 0 and increase strictly, got {self.bounds}")
        if self.byte_bounds != _byte_bounds(self.bounds, self.bits):
            raise ValueError(f"byte_bounds {self.byte_bounds} do not match bounds {self.bounds}")
        if (
            self.data.dtype != dtype
            or tuple(self.data.shape) != (self.num_rows, self.byte_bounds[-1])
            or self.data.stride(-1) != 1
        ):
            raise ValueError(
                f"data must be {dtype} of shape ({self.num_rows}, {self.byte_bounds[-1]}) with "
                f"unit column stride, got {self.data.dtype} {list(self.data.shape)}"
            )
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if t.dtype != torch.float32 or tuple(t.shape) != (self.num_rows, num_blocks):
                raise ValueError(
                    f"{name} must be float32 of shape ({self.num_rows}, {num_blocks}), "
                    f"got {t.dtype} {list(t.shape)}"
                )

    @property
    def nbytes(self) -> int:
        """Bytes of ``data``, ``scale`` and ``zero``."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def slice_blocks(self, l0: int, l1: int) -> PackedMatrix:
        """Blocks ``l0:l1`` (columns ``bounds[l0]:bounds[l1]``, rebased to 0), as views."""
        if not 0 <= l0 < l1 <= self.num_blocks:
            raise ValueError(
                f"block range {l0}:{l1} is empty or outside 0:{self.num_blocks}; "
                "use 0 <= l0 < l1 <= num_blocks"
            )
        a, c = self.byte_bounds[l0], self.byte_bounds[l1]
        return PackedMatrix(
            bits=self.bits,
            num_rows=self.num_rows,
            bounds=tuple(b - self.bounds[l0] for b in self.bounds[l0 : l1 + 1]),
            data=self.data[:, a:c],
            byte_bounds=tuple(b - a for b in self.byte_bounds[l0 : l1 + 1]),
            scale=self.scale[:, l0:l1],
            zero=self.zero[:, l0:l1],
        )

    def to(self, device: torch.device | str, *, pad: bool | None = None) -> PackedMatrix:
        """On ``device``: ``self`` when already there, else a copy. Packed rows are padded to
        start on 16-byte boundaries (:func:`pad_rows`, the Triton kernels' vector-load layout)
        when ``pad`` (default: on CUDA)."""
        device = resolve_device(device)
        pad = (device.type == "cuda" if pad is None else pad) and self.bits <= 8
        there = all(t.device == device for t in (self.data, self.scale, self.zero))
        if there and (not pad or rows_aligned(self.data)):
            return self
        data = pad_rows(self.data, device) if pad else self.data.to(device)
        return replace(self, data=data, scale=self.scale.to(device), zero=self.zero.to(device))

    @property
    def meta(self) -> dict:
        """The non-array fields, JSON-serializable (pairs with :meth:`to_arrays`)."""
        return {
            "bits": self.bits,
            "num_rows": self.num_rows,
            "bounds": list(self.bounds),
            "byte_bounds": list(self.byte_bounds),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """numpy views of ``data`` (bfloat16 as int16 bits), ``scale`` and ``zero`` (CPU only)."""
        data = self.data.view(torch.int16) if self.bits == 16 else self.data
        return {"data": data.numpy(), "scale": self.scale.numpy(), "zero": self.zero.numpy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict) -> PackedMatrix:
        """Inverse of :meth:`to_arrays`; zero-copy, read-only arrays (Ray object store) included.

        The tensors then share read-only memory: twa_ray only reads them.
        """
        with warnings.catch_warnings():  # torch warns on read-only numpy arrays
            warnings.simplefilter("ignore", UserWarning)
            data, scale, zero = (torch.from_numpy(arrays[k]) for k in ("data", "scale", "zero"))
        bits = int(meta["bits"])
        return cls(
            bits=bits,
            num_rows=int(meta["num_rows"]),
            bounds=tuple(int(b) for b in meta["bounds"]),
            data=data.view(torch.bfloat16) if bits == 16 else data,
            byte_bounds=tuple(int(b) for b in meta["byte_bounds"]),
            scale=scale,
            zero=zero,
        )


# ----------------------------------------------------------------------------- quantizing


def _affine(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` float32 of the min/max code on ``[lo, hi]``."""
    lo, hi = lo.float(), hi.float()  # rounding is monotonic: min/max commute with the cast
    scale = ((hi.double() - lo.double()) / ((1 << bits) - 1)).float()
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("the range of B overflows float32 scales; rescale B before quantizing")
    return scale, lo


def _encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code of ``x`` (float32); a zero scale (constant block) gives code 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((x - zero) / safe).round_().clamp_(0, (1 << bits) - 1)
    return q.to(torch.uint8)


def _empty(num_rows: int, blocks: Blocks, bits: int, device: torch.device) -> PackedMatrix:
    dtype = {16: torch.bfloat16, 32: torch.float32}.get(bits, torch.uint8)
    byte_bounds = _byte_bounds(blocks.bounds, bits)
    shape = (num_rows, blocks.num_blocks)
    return PackedMatrix(
        bits=bits,
        num_rows=num_rows,
        bounds=blocks.bounds,
        data=torch.empty(num_rows, byte_bounds[-1], dtype=dtype, device=device),
        byte_bounds=byte_bounds,
        scale=torch.ones(shape, device=device),  # 16/32 keep these; codes overwrite them
        zero=torch.zeros(shape, device=device),
    )


def quantize(
    B: torch.Tensor,
    blocks: Blocks,
    bits: int,
    *,
    granularity: Granularity = "row",
) -> PackedMatrix:
    """Quantize ``B`` ``(R, D)`` block by block with the affine min/max code.

    Float temporaries are bounded by a chunk of rows of one block.

    >>> from twa_ray.core.layout import Blocks
    >>> pm = quantize(torch.randn(3, 10), Blocks((0, 4, 10), ("a", "b")), 4)
    >>> pm.data.shape, pm.scale.shape
    (torch.Size([3, 5]), torch.Size([3, 2]))
    """
    _check_bits(bits)
    _check_granularity(granularity)
    if B.dim() != 2 or not B.is_floating_point() or B.shape[1] != blocks.numel or not len(B):
        raise ValueError(
            f"B must be a floating (R, {blocks.numel}) matrix, R >= 1, matching the blocks; "
            f"got {B.dtype} {list(B.shape)}"
        )
    _check_finite(B, "B")
    pm = _empty(B.shape[0], blocks, bits, B.device)
    if bits > 8:
        pm.data.copy_(B)
        return pm
    for blk, (a, b) in enumerate(zip(blocks.bounds, blocks.bounds[1:])):
        if granularity == "block":
            lo, hi = B[:, a:b].aminmax()
            scale, zero = _affine(lo, hi, bits)
            pm.scale[:, blk], pm.zero[:, blk] = scale, zero
        step = max(1, _CHUNK // (b - a))
        for r in range(0, B.shape[0], step):
            x = B[r : r + step, a:b].float()  # (rows, n_l)
            if granularity == "row":
                lo, hi = x.aminmax(dim=1)
                scale, zero = _affine(lo, hi, bits)
                pm.scale[r : r + step, blk], pm.zero[r : r + step, blk] = scale, zero
            q = _encode(
                x, pm.scale[r : r + step, blk : blk + 1], pm.zero[r : r + step, blk : blk + 1], bits
            )
            pm.data[r : r + step, pm.byte_bounds[blk] : pm.byte_bounds[blk + 1]] = _pack(q, bits)
    return pm


class PackedMatrixBuilder:
    """Build a CPU :class:`PackedMatrix` row by row, holding only the packed output and one row.

    Gives the same codes as :func:`quantize`. ``granularity="block"`` needs the code range of
    every block up front: ``lo``, ``hi`` ``(L,)`` (values outside are clamped); ``"row"`` takes
    them per row and block, ``(R, L)``, when a row's blocks are split across ranks
    (:mod:`twa_ray.core.sharded_subspace`), or computes them from each row.

    >>> from twa_ray.core.layout import Blocks
    >>> builder = PackedMatrixBuilder(2, Blocks((0, 4), ("w",)), 2)
    >>> for k in range(2):
    ...     builder.set_row(k, torch.arange(4.0) * (k + 1))
    >>> dequantize(builder.finish())
    tensor([[0., 1., 2., 3.],
            [0., 2., 4., 6.]])
    """

    def __init__(
        self,
        num_rows: int,
        blocks: Blocks,
        bits: int,
        granularity: Granularity = "row",
        lo: torch.Tensor | None = None,
        hi: torch.Tensor | None = None,
    ) -> None:
        _check_bits(bits)
        _check_granularity(granularity)
        if num_rows < 1:
            raise ValueError(f"num_rows={num_rows} must be >= 1")
        self.blocks, self.bits, self.granularity = blocks, bits, granularity
        self._pm = _empty(num_rows, blocks, bits, torch.device("cpu"))
        self._done = torch.zeros(num_rows, dtype=torch.bool)
        if (lo is None) != (hi is None) or (granularity == "block" and lo is None):
            raise ValueError(
                "granularity='block' needs lo and hi (L,); 'row' takes both (R, L) or neither"
            )
        self._ranged = lo is not None  # row ranges given: a block's range spans ranks (sharded)
        if lo is not None and hi is not None and bits <= 8:
            shape = (
                (blocks.num_blocks,) if granularity == "block" else (num_rows, blocks.num_blocks)
            )
            lo, hi = lo.to(self._pm.scale), hi.to(self._pm.scale)
            if tuple(lo.reshape(-1).shape) != (math.prod(shape),) or lo.numel() != hi.numel():
                raise ValueError(f"lo and hi must have shape {shape} (one entry per row and block)")
            lo, hi = lo.reshape(shape), hi.reshape(shape)
            _check_finite(torch.cat([lo, hi]), "lo/hi")
            if bool((hi < lo).any()):
                raise ValueError("hi must be >= lo in every block")
            scale, zero = _affine(lo, hi, bits)
            self._pm.scale[:] = scale
            self._pm.zero[:] = zero

    def set_row(self, k: int, row: torch.Tensor) -> None:
        """Quantize ``row`` ``(D,)`` into row ``k``."""
        pm = self._pm
        if not 0 <= k < pm.num_rows:
            raise ValueError(f"row k={k} is outside 0:{pm.num_rows}")
        if tuple(row.shape) != (pm.numel,):
            raise ValueError(f"row must have shape ({pm.numel},), got {list(row.shape)}")
        _check_finite(row, "row")
        if self.bits > 8:
            pm.data[k] = row
        else:
            for blk, (a, b) in enumerate(zip(pm.bounds, pm.bounds[1:])):
                x = row[a:b].float()
                if self.granularity == "row" and not self._ranged:
                    lo, hi = x.aminmax()
                    pm.scale[k, blk], pm.zero[k, blk] = _affine(lo, hi, self.bits)
                q = _encode(x, pm.scale[k, blk], pm.zero[k, blk], self.bits)
                pm.data[k, pm.byte_bounds[blk] : pm.byte_bounds[blk + 1]] = _pack(q, self.bits)
        self._done[k] = True

    def finish(self) -> PackedMatrix:
        """The packed matrix; every row must have been set."""
        missing = int((~self._done).sum())
        if missing:
            first = int((~self._done).nonzero()[0])
            raise ValueError(f"{missing} row(s) were never set (first: {first}); call set_row")
        return self._pm


# ----------------------------------------------------------------------------- decoding


def _dequantize_block(pm: PackedMatrix, blk: int) -> torch.Tensor:
    a, b = pm.bounds[blk], pm.bounds[blk + 1]
    if pm.bits > 8:
        return pm.data[:, a:b].float()
    q = unpack(pm.data[:, pm.byte_bounds[blk] : pm.byte_bounds[blk + 1]], pm.bits, b - a)
    return q.float() * pm.scale[:, blk : blk + 1] + pm.zero[:, blk : blk + 1]  # (R, n_l)


def dequantize(pm: PackedMatrix) -> torch.Tensor:
    """The float32 ``(R, D)`` matrix the codes stand for (tests and small matrices only)."""
    out = torch.empty(pm.num_rows, pm.numel, device=pm.data.device)
    for blk, (a, b) in enumerate(zip(pm.bounds, pm.bounds[1:])):
        out[:, a:b] = _dequantize_block(pm, blk)
    return out


def relative_error(B: torch.Tensor, pm: PackedMatrix) -> torch.Tensor:
    """``||B_l - deq(pm)_l|| / ||B_l||`` per block, float64 ``(L,)``; 0 where ``||B_l|| = 0``."""
    if tuple(B.shape) != (pm.num_rows, pm.numel):
        raise ValueError(
            f"B has shape {list(B.shape)}, the packed matrix is ({pm.num_rows}, {pm.numel})"
        )
    out = torch.zeros(pm.num_blocks, dtype=torch.float64)
    for blk, (a, b) in enumerate(zip(pm.bounds, pm.bounds[1:])):
        ref = B[:, a:b].double()
        norm = float(ref.norm())
        if norm > 0:
            out[blk] = float((ref - _dequantize_block(pm, blk).double()).norm()) / norm
    return out

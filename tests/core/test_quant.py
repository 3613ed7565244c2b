"""Packing, affine quantization and the PackedMatrix container, against plain references."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packed_reference import blocks_of, dequantize64

from twa_ray.core.quant import (
    ALLOWED_BITS,
    PackedMatrix,
    PackedMatrixBuilder,
    dequantize,
    pack,
    quantize,
    relative_error,
    unpack,
)

PACKED = (1, 2, 4, 8)


# ----------------------------------------------------------------------------- pack / unpack


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(PACKED),
    rows=st.integers(0, 3),
    n=st.integers(0, 70),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(bits: int, rows: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (rows, n), generator=gen, dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, -(-n * bits // 8))
    assert torch.equal(unpack(packed, bits, n), q)


@pytest.mark.parametrize("bits", PACKED)
def test_pack_bit_layout(bits: int) -> None:
    """Code j sits in byte j // (8/b) at bit offset (j % (8/b)) * b, little-endian in the byte."""
    q = torch.randint(0, 1 << bits, (13,), dtype=torch.uint8)
    per = 8 // bits
    expect = [0] * (-(-13 // per))
    for j, code in enumerate(q.tolist()):
        expect[j // per] |= code << ((j % per) * bits)
    assert pack(q, bits).tolist() == expect


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"bits=3 is not supported; use one of 1, 2, 4, 8"):
        pack(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="< 2\\*\\*bits = 4"):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.zeros(4, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)


# ----------------------------------------------------------------------------- quantize


def test_bad_bits_and_granularity_are_rejected() -> None:
    B, blocks = torch.randn(2, 5), blocks_of(5)
    with pytest.raises(ValueError, match=r"bits=3 is not supported; use one of 1, 2, 4, 8, 16, 32"):
        quantize(B, blocks, 3)
    with pytest.raises(ValueError, match="granularity='col'"):
        quantize(B, blocks, 4, granularity="col")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(R, 6\)"):
        quantize(B, blocks_of(6), 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(bad: float) -> None:
    B = torch.randn(3, 8)
    B[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(B, blocks_of(8), 4)
    builder = PackedMatrixBuilder(3, blocks_of(8), 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        builder.set_row(1, B[1])


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_codes_are_nearest_and_error_shrinks_with_bits(seed, granularity) -> None:
    B = torch.randn(6, 3000)
    blocks = blocks_of(1000, 1500, 500)
    errors = []
    for bits in ALLOWED_BITS:
        pm = quantize(B, blocks, bits, granularity=granularity)
        deq = dequantize64(pm)
        assert torch.allclose(dequantize(pm).double(), deq, rtol=1e-6, atol=1e-6)
        if bits <= 8:  # nearest code: within half a step (plus float32 rounding)
            step = pm.scale.double().repeat_interleave(torch.tensor(blocks.sizes), dim=1)
            assert bool(((B.double() - deq).abs() <= step / 2 + 1e-5).all())
        errors.append(float(relative_error(B, pm).max()))
    assert all(a > b for a, b in zip(errors, errors[1:-1]))
    assert errors[ALLOWED_BITS.index(8)] < 0.01
    assert errors[-1] == 0.0  # float32 keeps B exactly


def test_block_granularity_shares_scale_over_rows(seed) -> None:
    pm = quantize(torch.randn(5, 40), blocks_of(10, 30), 4, granularity="block")
    assert torch.equal(pm.scale, pm.scale[:1].expand(5, 2))
    assert torch.equal(pm.zero, pm.zero[:1].expand(5, 2))


@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_constant_and_zero_blocks_dequantize_exactly(bits: int) -> None:
    B = torch.randn(4, 1 + 9 + 7 + 20)
    B[:, 0] = torch.tensor([-2.5, 0.0, 1.0, 3.0])  # one-column block (bfloat16-exact values)
    B[:, 1:10] = 0.0  # zero block
    B[:, 10:17] = 0.375  # constant block
    B[2, 17:] = -1.25  # one constant row of a block
    pm = quantize(B, blocks_of(1, 9, 7, 20), bits)
    deq = dequantize(pm)
    assert bool(torch.isfinite(deq).all())
    assert torch.equal(deq[:, :17], B[:, :17])
    assert torch.equal(deq[2, 17:], B[2, 17:])
    err = relative_error(B, pm)
    assert bool(torch.isfinite(err).all()) and err[1] == 0.0 and err[2] == 0.0


@pytest.mark.parametrize("bits", ALLOWED_BITS)
@pytest.mark.parametrize("granularity", ["row", "block"])
def test_builder_equals_quantize(seed, bits: int, granularity: str) -> None:
    B = torch.randn(5, 77, dtype=torch.float64)
    blocks = blocks_of(1, 13, 63)
    ref = quantize(B, blocks, bits, granularity=granularity)  # type: ignore[arg-type]
    ranges = {}
    if granularity == "block":
        ranges = {
            "lo": torch.stack([B[:, a:b].min() for a, b in zip(blocks.bounds, blocks.bounds[1:])]),
            "hi": torch.stack([B[:, a:b].max() for a, b in zip(blocks.bounds, blocks.bounds[1:])]),
        }
    builder = PackedMatrixBuilder(5, blocks, bits, granularity, **ranges)  # type: ignore[arg-type]
    for k in reversed(range(5)):  # any order
        builder.set_row(k, B[k])
    pm = builder.finish()
    assert torch.equal(pm.data, ref.data)
    assert torch.equal(pm.scale, ref.scale) and torch.equal(pm.zero, ref.zero)


def test_builder_errors() -> None:
    blocks = blocks_of(4, 4)
    with pytest.raises(ValueError, match="lo and hi"):
        PackedMatrixBuilder(2, blocks, 4, "block")
    with pytest.raises(ValueError, match="hi must be >= lo"):
        PackedMatrixBuilder(2, blocks, 4, "block", lo=torch.ones(2), hi=torch.zeros(2))
    builder = PackedMatrixBuilder(2, blocks, 4)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        builder.set_row(0, torch.zeros(7))
    with pytest.raises(ValueError, match="outside 0:2"):
        builder.set_row(2, torch.zeros(8))
    builder.set_row(0, torch.zeros(8))
    with pytest.raises(ValueError, match="1 row\\(s\\) were never set \\(first: 1\\)"):
        builder.finish()


def test_block_builder_clamps_values_outside_the_range() -> None:
    builder = PackedMatrixBuilder(
        1, blocks_of(3), 2, "block", lo=torch.zeros(1), hi=torch.full((1,), 3.0)
    )
    builder.set_row(0, torch.tensor([-5.0, 1.0, 9.0]))
    assert dequantize(builder.finish()).tolist() == [[0.0, 1.0, 3.0]]


# ----------------------------------------------------------------------------- container


@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_slice_blocks_and_array_round_trip(bits: int) -> None:
    B = torch.randn(3, 50)
    pm = quantize(B, blocks_of(5, 11, 30, 4), bits)
    part = pm.slice_blocks(1, 3)
    assert part.bounds == (0, 11, 41) and part.num_blocks == 2 and part.numel == 41
    assert part.data.data_ptr() == pm.data[:, pm.byte_bounds[1] :].data_ptr()  # a view
    assert torch.equal(dequantize(part), dequantize(pm)[:, 5:46])

    arrays, meta = pm.to_arrays(), json.loads(json.dumps(pm.meta))
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    for a in arrays.values():  # the Ray object store hands out read-only arrays
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = PackedMatrix.from_arrays(arrays, meta)
    assert back.bits == bits and back.bounds == pm.bounds and back.byte_bounds == pm.byte_bounds
    assert torch.equal(dequantize(back), dequantize(pm))
    assert back.data.data_ptr() == pm.data.data_ptr()  # zero-copy
    assert back.nbytes == pm.nbytes


def test_nbytes_counts_packed_bytes() -> None:
    pm = quantize(torch.randn(100, 1000), blocks_of(250, 750), 4)
    assert pm.data.shape == (100, 500)
    assert pm.nbytes == 100 * 500 + 2 * 100 * 2 * 4
    assert quantize(torch.randn(2, 9), blocks_of(9), 1).data.shape == (2, 2)


def test_post_init_rejects_inconsistent_fields() -> None:
    pm = quantize(torch.randn(2, 10), blocks_of(4, 6), 4)
    with pytest.raises(ValueError, match="data must be"):
        PackedMatrix(4, 2, pm.bounds, pm.data[:, :4], pm.byte_bounds, pm.scale, pm.zero)
    with pytest.raises(ValueError, match="byte_bounds"):
        PackedMatrix(4, 2, pm.bounds, pm.data, (0, 3, 5), pm.scale, pm.zero)
    with pytest.raises(ValueError, match="scale must be"):
        PackedMatrix(4, 2, pm.bounds, pm.data, pm.byte_bounds, pm.scale.double(), pm.zero)
    with pytest.raises(ValueError, match="block range"):
        pm.slice_blocks(1, 1)

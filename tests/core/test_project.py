"""project / reconstruct from packed bytes against float64 dequantize-then-multiply references.

Every test runs on every CPU path: each path of the compiled C kernel that this CPU can run
(forced with ``TWA_RAY_KERNEL_PATH``; the others are skipped with the reason) and the pure-torch
fallback (``TWA_RAY_NO_CKERNEL=1``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packed_reference import blocks_of, dequantize64

from twa_ray.core.kernels import cpu
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import ALLOWED_BITS, quantize

# block sizes: a single column, odd sizes, more than one 4096-column tile, a partial last tile
SIZES = (1, 7, 33, 300, 4096 + 130, 64)
TOL = 1e-5


def _project64(B64: torch.Tensor, g: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    g64 = g.double()
    return torch.stack([B64[:, a:b] @ g64[a:b] for a, b in zip(bounds, bounds[1:])], dim=1)


def _reconstruct64(B64, alpha, origin, bounds) -> torch.Tensor:
    out = torch.zeros(B64.shape[1], dtype=torch.float64) if origin is None else origin.double()
    for blk, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out[a:b] += alpha[:, blk].double() @ B64[:, a:b]
    return out


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


@pytest.fixture(params=[*cpu.PATHS, "torch"])
def path(request, monkeypatch) -> str:
    """A forced kernel path: ``portable``, ``avx2``, ... (the C kernel) or ``torch``."""
    if request.param == "torch":
        monkeypatch.setenv("TWA_RAY_NO_CKERNEL", "1")
        return "torch"
    lib = cpu.load()
    if lib is None:
        pytest.skip("no C compiler")
    if request.param not in cpu.available(lib):
        pytest.skip(f"this CPU or compiler cannot run the {request.param} path")
    monkeypatch.delenv("TWA_RAY_NO_CKERNEL", raising=False)
    monkeypatch.setenv(cpu.ENV_PATH, request.param)
    return request.param


@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_matches_float64_dequantize_then_multiply(seed, path, bits: int) -> None:
    blocks = blocks_of(*SIZES)
    B = torch.randn(7, blocks.numel)  # 7 rows: not a multiple of the kernels' row groups
    pm = quantize(B, blocks, bits)
    B64 = dequantize64(pm)
    g, alpha, origin = (
        torch.randn(blocks.numel),
        torch.randn(7, len(SIZES)),
        torch.randn(blocks.numel),
    )
    assert _rel(project(pm, g), _project64(B64, g, blocks.bounds)) < TOL
    assert (
        _rel(reconstruct(pm, alpha, origin), _reconstruct64(B64, alpha, origin, blocks.bounds))
        < TOL
    )
    assert _rel(reconstruct(pm, alpha), _reconstruct64(B64, alpha, None, blocks.bounds)) < TOL


def test_float32_matches_the_unquantized_float64_matrix(seed, path) -> None:
    blocks = blocks_of(*SIZES)
    B64 = torch.randn(5, blocks.numel, dtype=torch.float64)
    pm = quantize(B64, blocks, 32)
    g, alpha = torch.randn(blocks.numel), torch.randn(5, len(SIZES))
    assert _rel(project(pm, g), _project64(B64, g, blocks.bounds)) < TOL
    assert _rel(reconstruct(pm, alpha), _reconstruct64(B64, alpha, None, blocks.bounds)) < TOL


@settings(max_examples=20, deadline=None)
@given(
    bits=st.sampled_from((1, 2, 4, 8, 16)),
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=5),
    rows=st.integers(1, 9),
    granularity=st.sampled_from(("row", "block")),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(bits, sizes, rows, granularity, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks = blocks_of(*sizes)
    pm = quantize(
        torch.randn(rows, blocks.numel, generator=gen), blocks, bits, granularity=granularity
    )
    B64 = dequantize64(pm)
    g = torch.randn(blocks.numel, generator=gen)
    alpha = torch.randn(rows, len(sizes), generator=gen)
    # float32 sums are accurate relative to the sum of |terms|, not to a result that cancels
    # (one row, one block: scale <q, g> and zero sum(g) can nearly cancel)
    a, a64 = project(pm, g), _project64(B64, g, blocks.bounds)
    assert float((a.double() - a64).norm()) < TOL * float(
        _project64(B64.abs(), g.abs(), blocks.bounds).norm()
    )
    theta, theta64 = reconstruct(pm, alpha), _reconstruct64(B64, alpha, None, blocks.bounds)
    assert float((theta.double() - theta64).norm()) < TOL * float(
        _reconstruct64(B64.abs(), alpha.abs(), None, blocks.bounds).norm()
    )


@pytest.mark.parametrize("bits", ALLOWED_BITS)
@pytest.mark.parametrize("rows", (5, 6))  # 5: strided and contiguous sgemv differed (MKL, AVX-512)
def test_slices_agree_with_the_whole_bitwise(seed, path, bits: int, rows: int) -> None:
    """A block gives the same bits in the whole basis and in a shard (the placements' promise),
    whether the shard is a view (strided rows) or a copy of its own (every BLAS operand at
    another address and stride); one-block shards make the coefficient column contiguous."""
    blocks = blocks_of(*SIZES)
    pm = quantize(torch.randn(rows, blocks.numel), blocks, bits)
    g, alpha, origin = (
        torch.randn(blocks.numel),
        torch.randn(rows, len(SIZES)),
        torch.randn(blocks.numel),
    )
    whole_a, whole_theta = project(pm, g), reconstruct(pm, alpha, origin)
    for l0, l1 in ((2, 5), (0, 1), (4, 5), (5, 6), (1, 6)):
        a, b = blocks.bounds[l0], blocks.bounds[l1]
        view = pm.slice_blocks(l0, l1)  # strided rows: a column slice of the packed bytes
        copy = dataclasses.replace(
            view, data=view.data.clone(), scale=view.scale.clone(), zero=view.zero.clone()
        )
        g_part = torch.empty(b - a + 3)[3:].copy_(g[a:b])  # another alignment than g[a:b]
        for part in (view, copy):
            assert torch.equal(project(part, g[a:b]), whole_a[:, l0:l1]), (l0, l1)
            assert torch.equal(project(part, g_part), whole_a[:, l0:l1]), (l0, l1)
            theta = reconstruct(part, alpha[:, l0:l1].contiguous(), origin[a:b])
            assert torch.equal(theta, whole_theta[a:b]), (l0, l1)


# many tiny blocks (1..16 columns, the BatchNorm vectors of a ResNet), widths that are not a
# multiple of a 32-byte vector, and one block of three full 4096-column tiles plus a partial one
TINY_AND_HUGE = (*range(1, 17), 31, 64, 65, 3 * 4096 + 77, 16, 3)


@pytest.mark.parametrize("bits", ALLOWED_BITS)
@pytest.mark.parametrize("rows", (1, 2, 3, 6))
def test_many_tiny_blocks_and_one_huge_block(seed, path, bits: int, rows: int) -> None:
    """Partial vectors are read in place except at the very end of the bytes; row counts that
    are not a multiple of the kernels' row group run as one smaller group. (The torch path's
    float32 matmul over the 12k-column block drifts past TOL now and then: its bound is looser.)"""
    tol = 1e-4 if path == "torch" else TOL
    blocks = blocks_of(*TINY_AND_HUGE)
    for granularity in ("row", "block"):
        pm = quantize(torch.randn(rows, blocks.numel), blocks, bits, granularity=granularity)
        # a fresh tensor of exactly the packed size: the last row ends the allocation
        pm = dataclasses.replace(pm, data=pm.data.clone())
        B64 = dequantize64(pm)
        g, alpha, origin = (
            torch.randn(blocks.numel),
            torch.randn(rows, len(TINY_AND_HUGE)),
            torch.randn(blocks.numel),
        )
        assert _rel(project(pm, g), _project64(B64, g, blocks.bounds)) < tol
        theta = reconstruct(pm, alpha, origin)
        assert _rel(theta, _reconstruct64(B64, alpha, origin, blocks.bounds)) < tol


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
@pytest.mark.parametrize("magnitude", (1e-30, 1e-6, 1e6, 1e30))
def test_extreme_magnitudes_of_g_and_alpha(seed, path, bits: int, magnitude: float) -> None:
    """The AVX2 kernels scale g / the coefficients by powers of two chosen from their largest
    magnitude; tiny and huge inputs must come out as accurate as unit ones."""
    blocks = blocks_of(*SIZES)
    pm = quantize(torch.randn(5, blocks.numel), blocks, bits)
    B64 = dequantize64(pm)
    g = torch.randn(blocks.numel) * magnitude
    alpha = torch.randn(5, len(SIZES)) * magnitude
    assert _rel(project(pm, g), _project64(B64, g, blocks.bounds)) < TOL
    assert _rel(reconstruct(pm, alpha), _reconstruct64(B64, alpha, None, blocks.bounds)) < TOL


def test_out_and_in_place_origin(seed, path) -> None:
    blocks = blocks_of(*SIZES)
    pm = quantize(torch.randn(4, blocks.numel), blocks, 4)
    alpha, origin = torch.randn(4, len(SIZES)), torch.randn(blocks.numel)
    expect = reconstruct(pm, alpha, origin)
    out = torch.empty(blocks.numel)
    assert reconstruct(pm, alpha, origin, out=out) is out
    assert torch.equal(out, expect)
    theta = origin.clone()
    reconstruct(pm, alpha, theta, out=theta)  # theta <- theta + B^T alpha, in place
    assert torch.equal(theta, expect)


def test_constant_and_zero_blocks_give_no_nan(path) -> None:
    B = torch.zeros(3, 40)
    B[:, 10:25] = 2.0
    blocks = blocks_of(10, 15, 15)
    for bits in ALLOWED_BITS:
        pm = quantize(B, blocks, bits)
        a = project(pm, torch.ones(40))
        assert torch.equal(a, torch.tensor([[0.0, 30.0, 0.0]] * 3))
        theta = reconstruct(pm, torch.ones(3, 3), torch.zeros(40))
        assert torch.equal(theta, 3 * B[0])


def test_c_and_torch_paths_agree(seed, path, monkeypatch) -> None:
    if path == "torch":
        pytest.skip("compares each C path with the torch path")
    blocks = blocks_of(*SIZES)
    pm = quantize(torch.randn(9, blocks.numel), blocks, 2)
    g, alpha = torch.randn(blocks.numel), torch.randn(9, len(SIZES))
    c = project(pm, g), reconstruct(pm, alpha)
    monkeypatch.setenv("TWA_RAY_NO_CKERNEL", "1")
    t = project(pm, g), reconstruct(pm, alpha)
    assert torch.allclose(c[0], t[0], rtol=1e-5, atol=1e-3)
    assert torch.allclose(c[1], t[1], rtol=1e-5, atol=1e-5)


def test_kernel_cache_is_keyed_by_cpu_and_written_once(tmp_path, monkeypatch) -> None:
    """Builds are cached under a key of source, compiler, flags and CPU, written atomically."""
    monkeypatch.setenv("TWA_RAY_CACHE_DIR", str(tmp_path))
    lib = cpu.build(("-O1",))
    if lib is None:
        pytest.skip("no C compiler")
    files = [p.name for p in tmp_path.iterdir()]
    assert len(files) == 1 and files[0].startswith("packed-") and files[0].endswith(".so")
    assert cpu.build(("-O1",)) is not None  # cached: no new file, no temp file left behind
    assert [p.name for p in tmp_path.iterdir()] == files
    assert "portable" in cpu.available(lib)
    cc = cpu._compiler()
    assert cc is not None
    here = cpu.library_file(("-O1",), cc)
    monkeypatch.setattr(cpu, "_cpu_id", lambda: "model name : another CPU\nflags : sse2")
    assert cpu.library_file(("-O1",), cc) != here


def test_loading_the_kernel_keeps_subnormals_and_works_under_flush_denormal(seed, path) -> None:
    """The library must not switch the process to flush-to-zero (as -ffast-math builds do), and
    the avx2sub path reads codes as subnormal floats, so it must work when the caller flushes
    them."""
    tiny = torch.tensor([1e-40])
    assert float(tiny * 1.0) > 0.0
    blocks = blocks_of(*SIZES)
    pm = quantize(torch.randn(5, blocks.numel), blocks, 4)
    g, alpha = torch.randn(blocks.numel), torch.randn(5, len(SIZES))
    expect = project(pm, g), reconstruct(pm, alpha)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = project(pm, g), reconstruct(pm, alpha)
        assert float(tiny * 1.0) == 0.0  # the caller's mode is restored after the kernels
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_inputs_are_validated() -> None:
    pm = quantize(torch.randn(2, 10), blocks_of(4, 6), 4)
    with pytest.raises(ValueError, match=r"g must be a float32 vector of shape \(10,\)"):
        project(pm, torch.zeros(9))
    with pytest.raises(ValueError, match="float32"):
        project(pm, torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"alpha must be float32 of shape \(2, 2\)"):
        reconstruct(pm, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="origin"):
        reconstruct(pm, torch.zeros(2, 2), torch.zeros(11))
    with pytest.raises(ValueError, match="contiguous"):
        reconstruct(pm, torch.zeros(2, 2), out=torch.zeros(20)[::2])

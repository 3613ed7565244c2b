"""The triton kernels on packed codes against a float64 reference built by unpacking in torch.

Without a GPU the kernels run under the triton interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is first imported and stay on while they run. So the
small tests run in this process only on a GPU or when the variable was set from the start;
otherwise ``test_small_cases_under_interpreter`` re-runs this file in a subprocess with it set
(so the interpreter never leaks into the other tests of the session).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twa_ray.core.kernels import triton_packed as tp

_INNER = "TWA_TRITON_TEST_INNER"
_ON_GPU = torch.cuda.is_available()
_RUNS_HERE = tp.available()
_DEVICE = "cuda" if _ON_GPU else "cpu"

small = pytest.mark.skipif(
    not _RUNS_HERE,
    reason="no CUDA device and TRITON_INTERPRET is not on in this process "
    "(covered by test_small_cases_under_interpreter in a subprocess)",
)


# ----------------------------------------------------------------------------- reference


def _byte_bounds(bounds: list[int], bits: int) -> list[int]:
    out = [0]
    for a, b in zip(bounds, bounds[1:]):
        out.append(out[-1] + -(-(b - a) * bits // 8))
    return out


def _unpack(
    codes: torch.Tensor, bits: int, bounds: list[int], byte_bounds: list[int]
) -> torch.Tensor:
    """Codes ``(R, D)`` int64 from packed bytes: code j of block i in byte j // (8/b), bit (j % (8/b)) * b."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, device=codes.device)
    cols = []
    for i in range(len(bounds) - 1):
        n = bounds[i + 1] - bounds[i]
        raw = codes[:, byte_bounds[i] : byte_bounds[i + 1]].long()  # (R, nb)
        q = (raw[:, :, None] >> shifts) & ((1 << bits) - 1)  # (R, nb, per)
        cols.append(q.reshape(codes.shape[0], -1)[:, :n])
        assert q.shape[1] * per >= n
    return torch.cat(cols, dim=1)


def _dequantize64(codes, bits, bounds, byte_bounds, scale, zero) -> torch.Tensor:
    q = _unpack(codes, bits, bounds, byte_bounds).double()
    sizes = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=codes.device)
    s = torch.repeat_interleave(scale.double(), sizes, dim=1)
    z = torch.repeat_interleave(zero.double(), sizes, dim=1)
    return s * q + z  # (R, D)


def _make(bits, sizes, num_rows, *, pad_stride, seed=0, device=_DEVICE):
    """Random packed codes (every byte random: the unused bits of a block's last byte too),
    scales/zeros like a min/max code of ~unit-norm blocks."""
    gen = torch.Generator().manual_seed(seed)
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    byte_bounds = _byte_bounds(bounds, bits)
    nbytes = byte_bounds[-1]
    if pad_stride:  # row stride a multiple of 16, 16-aligned base: the vector-load path
        stride = -(-nbytes // 16) * 16 + 16
        codes = torch.randint(0, 256, (num_rows, stride), generator=gen, dtype=torch.uint8)
        codes = codes.to(device)[:, :nbytes]
    else:  # odd base pointer and row stride nbytes + 1: the masked path
        codes = torch.randint(0, 256, (num_rows, nbytes + 1), generator=gen, dtype=torch.uint8)
        codes = codes.to(device)[:, 1:]
    num_blocks = len(sizes)
    inv = torch.tensor([1.0 / max(n, 1) ** 0.5 for n in sizes])
    scale = 6 * inv / ((1 << bits) - 1) * (0.5 + torch.rand(num_rows, num_blocks, generator=gen))
    zero = -3 * inv * (0.5 + torch.rand(num_rows, num_blocks, generator=gen))
    return codes, bounds, byte_bounds, scale.float().to(device), zero.float().to(device)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- host helpers


def test_tile_table_covers_every_byte_once():
    byte_bounds = [0, 3, 3, 40, 41, 300, 1000]
    for align in (1, 16):
        for tile in (16, 64):
            blocks, starts = tp.tile_table(byte_bounds, tile, align)
            seen = torch.zeros(byte_bounds[-1], dtype=torch.int64)
            for i, s in zip(blocks.tolist(), starts.tolist()):
                assert s % align == 0
                lo, hi = max(s, byte_bounds[i]), min(s + tile, byte_bounds[i + 1])
                assert lo < hi  # no empty tiles
                seen[lo:hi] += 1
            assert bool((seen == 1).all())
            assert 1 not in blocks.tolist()  # the empty block gets no tile


def test_pad_rows_selects_the_vector_path():
    from twa_ray.core.quant import pad_rows, rows_aligned

    codes = torch.randint(0, 256, (3, 21), dtype=torch.uint8)[:, 1:]  # odd base and stride
    assert not tp._row_layout(codes)[0] and not rows_aligned(codes)
    padded = pad_rows(codes)
    assert rows_aligned(padded)
    assert torch.equal(padded, codes) and padded.stride() == (32, 1)
    assert tp._row_layout(padded) == (True, 32, 32)


def test_config_validation():
    with pytest.raises(ValueError, match="tile_bytes"):
        tp.KernelConfig(tile_bytes=48)
    with pytest.raises(ValueError, match="rows"):
        tp.KernelConfig(rows=3)
    with pytest.raises(ValueError, match="bits"):
        tp.default_config(16)


def test_import_stays_light():
    code = (
        "import sys; import twa_ray.core.kernels.triton_packed as m; "
        "bad = [x for x in ('ray', 'pyarrow') if x in sys.modules]; "
        "assert not bad, bad; import twa_ray; "
        "bad = [x for x in ('ray', 'pyarrow') if x in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- kernels

_SIZES = [1, 7, 64, 333, 1000, 2049, 5, 130]


_CASES = [(b, pad, 13) for b in (1, 2, 4, 8) for pad in (True, False)] + [
    (4, True, 1),
    (8, False, 1),
]


@small
@pytest.mark.parametrize(("bits", "pad_stride", "num_rows"), _CASES)
def test_project_and_reconstruct(bits, pad_stride, num_rows):
    codes, bounds, byte_bounds, scale, zero = _make(bits, _SIZES, num_rows, pad_stride=pad_stride)
    gen = torch.Generator().manual_seed(1)
    D = bounds[-1]
    g = torch.randn(D, generator=gen).to(_DEVICE)
    alpha = torch.randn(num_rows, len(_SIZES), generator=gen).to(_DEVICE)
    origin = torch.randn(D, generator=gen).to(_DEVICE)
    B = _dequantize64(codes, bits, bounds, byte_bounds, scale, zero)
    sizes = torch.tensor(_SIZES, device=codes.device)

    a = tp.project_triton(codes, bits, bounds, byte_bounds, scale, zero, g)
    a_ref = torch.stack([B[:, s:e] @ g[s:e].double() for s, e in zip(bounds, bounds[1:])], dim=1)
    assert a.dtype == torch.float32 and a.shape == (num_rows, len(_SIZES))
    assert _rel(a, a_ref) < 1e-5

    theta = tp.reconstruct_triton(codes, bits, bounds, byte_bounds, scale, zero, alpha, origin)
    theta_ref = origin.double() + (torch.repeat_interleave(alpha.double(), sizes, dim=1) * B).sum(0)
    assert theta.dtype == torch.float32 and theta.shape == (D,)
    assert _rel(theta, theta_ref) < 1e-5


@small
@pytest.mark.parametrize("bits", [1, 4])
def test_options(bits):
    """bf16 g, no origin, out= aliasing origin, a small config (many tiles per block),
    K not a power of two and larger than the rows per iteration."""
    num_rows, sizes = 11, [3, 517, 96, 1]
    codes, bounds, byte_bounds, scale, zero = _make(bits, sizes, num_rows, pad_stride=True, seed=3)
    D = bounds[-1]
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(D, generator=gen).to(torch.bfloat16).to(_DEVICE)
    alpha = torch.randn(num_rows, len(sizes), generator=gen).to(_DEVICE)
    B = _dequantize64(codes, bits, bounds, byte_bounds, scale, zero)
    w = torch.repeat_interleave(alpha.double(), torch.tensor(sizes, device=codes.device), dim=1)
    cfg = tp.KernelConfig(tile_bytes=16, rows=4, vec=4, num_warps=1)

    a = tp.project_triton(codes, bits, bounds, byte_bounds, scale, zero, g, config=cfg)
    a_ref = torch.stack([B[:, s:e] @ g[s:e].double() for s, e in zip(bounds, bounds[1:])], dim=1)
    assert _rel(a, a_ref) < 1e-5

    theta = tp.reconstruct_triton(
        codes, bits, bounds, byte_bounds, scale, zero, alpha, None, config=cfg
    )
    assert _rel(theta, (w * B).sum(0)) < 1e-5

    buf = torch.randn(D, generator=gen).to(_DEVICE)
    ref = buf.double() + (w * B).sum(0)
    out = tp.reconstruct_triton(codes, bits, bounds, byte_bounds, scale, zero, alpha, buf, out=buf)
    assert out is buf
    assert _rel(buf, ref) < 1e-5


@small
def test_packed_matrix_wrappers():
    """project / reconstruct on an object with PackedMatrix's fields, slices (views) included."""
    from types import SimpleNamespace

    codes, bounds, byte_bounds, scale, zero = _make(4, [40, 9, 70], 5, pad_stride=False, seed=5)
    pm = SimpleNamespace(
        bits=4,
        bounds=tuple(bounds),
        byte_bounds=tuple(byte_bounds),
        data=codes,
        scale=scale,
        zero=zero,
    )
    g = torch.randn(bounds[-1]).to(_DEVICE)
    alpha = torch.randn(5, 3).to(_DEVICE)
    B = _dequantize64(codes, 4, bounds, byte_bounds, scale, zero)
    a_ref = torch.stack([B[:, s:e] @ g[s:e].double() for s, e in zip(bounds, bounds[1:])], dim=1)
    assert _rel(tp.project(pm, g), a_ref) < 1e-5
    theta = tp.reconstruct(pm, alpha)
    w = torch.repeat_interleave(
        alpha.double(), torch.tensor([40, 9, 70], device=codes.device), dim=1
    )
    assert _rel(theta, (w * B).sum(0)) < 1e-5
    # a view starting mid-row (block 1 onwards): unaligned base pointer
    view = SimpleNamespace(
        bits=4,
        bounds=(0, 9, 79),
        byte_bounds=(0, 5, 40),
        data=codes[:, 20:],
        scale=scale[:, 1:],
        zero=zero[:, 1:],
    )
    assert _rel(tp.project(view, g[40:]), a_ref[:, 1:]) < 1e-5


@small
def test_bad_inputs():
    codes, bounds, byte_bounds, scale, zero = _make(4, [10, 20], 3, pad_stride=False)
    g = torch.zeros(30, device=codes.device)
    with pytest.raises(ValueError, match="bits"):
        tp.project_triton(codes, 3, bounds, byte_bounds, scale, zero, g)
    with pytest.raises(ValueError, match="need"):
        tp.project_triton(codes, 4, bounds, [0, 4, 15], scale, zero, g)
    with pytest.raises(ValueError, match="g must be"):
        tp.project_triton(codes, 4, bounds, byte_bounds, scale, zero, g[:5])
    with pytest.raises(ValueError, match="scale"):
        tp.project_triton(codes, 4, bounds, byte_bounds, scale.double(), zero, g)


@pytest.mark.slow  # a pytest subprocess under the triton interpreter (minutes on 2 cores)
def test_small_cases_under_interpreter():
    """Without a GPU: run this file's kernel tests under the triton interpreter in a subprocess."""
    if _RUNS_HERE or os.environ.get(_INNER):
        pytest.skip("the kernel tests run in this process")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", **{_INNER: "1"})
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-m",
            "not gpu",
            str(Path(__file__).resolve()),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail, tail
    print(tail.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- full size (GPU)


def _resnet18_sizes() -> list[int]:
    """numel of torchvision resnet18's parameters, in order (11,689,512 in all)."""
    sizes = [64 * 3 * 49, 64, 64]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            first = b == 0
            sizes += [cout * (cin if first else cout) * 9, cout, cout, cout * cout * 9, cout, cout]
            if first and (stride != 1 or cin != cout):
                sizes += [cout * cin, cout, cout]
        cin = cout
    return sizes + [1000 * 512, 1000]


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [1, 4])
def test_full_size_resnet18(bits):
    sizes = _resnet18_sizes()
    assert sum(sizes) == 11_689_512
    num_rows = 100
    codes, bounds, byte_bounds, scale, zero = _make(bits, sizes, num_rows, pad_stride=True)
    D = bounds[-1]
    g = torch.randn(D, device="cuda")
    alpha = torch.randn(num_rows, len(sizes), device="cuda") * 0.01
    origin = torch.randn(D, device="cuda")
    a = tp.project_triton(codes, bits, bounds, byte_bounds, scale, zero, g)
    theta = tp.reconstruct_triton(codes, bits, bounds, byte_bounds, scale, zero, alpha, origin)
    a_ref = torch.empty(num_rows, len(sizes), dtype=torch.float64, device="cuda")
    theta_ref = origin.double()
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):  # block by block: bounded memory
        raw = codes[:, byte_bounds[i] : byte_bounds[i + 1]]
        q = _unpack(raw, bits, [0, e - s], [0, raw.shape[1]])
        Bl = scale[:, i : i + 1].double() * q.double() + zero[:, i : i + 1].double()
        a_ref[:, i] = Bl @ g[s:e].double()
        theta_ref[s:e] += alpha[:, i].double() @ Bl
    assert _rel(a, a_ref) < 1e-4
    assert _rel(theta, theta_ref) < 1e-4


# ----------------------------------------------------------------------------- compiles (no GPU)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 4])
def test_compiles_for_hopper_with_vector_loads(bits):
    """Both kernels compile for sm_90 without a GPU (triton's bundled ptxas), and the aligned
    path loads the codes with vector loads."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"triton's compile API moved: {e}")
    if tp._interpreted():
        pytest.skip("kernels were set up by the interpreter")
    cfg = tp.default_config(bits)
    width = {16: "v4.b32", 8: "v2.b32", 4: "b32"}[cfg.vec]
    for kernel in (tp._project_kernel, tp._reconstruct_kernel):
        consts = dict(
            BITS=bits,
            TILE=cfg.tile_bytes,
            ROWS=cfg.rows,
            VEC=cfg.vec,
            ALIGNED=True,
            HAS_ORIGIN=True,
        )
        sig, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in consts:
                sig[name], constexprs[(i,)] = "constexpr", consts[name]
            elif name.endswith("_ptr"):
                sig[name] = {"codes_ptr": "*u8"}.get(
                    name, "*i32" if "bound" in name or "tile" in name else "*fp32"
                )
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "i32"
                if name in ("row_stride", "row_step", "row_limit"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        try:
            src = ASTSource(kernel, sig, constexprs, attrs)
            compiled = triton.compile(
                src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps}
            )
        except (TypeError, AttributeError, KeyError) as e:
            pytest.skip(f"triton's compile API changed: {e!r}")
        ptx = compiled.asm["ptx"]
        assert f"ld.global.{width}" in ptx or (width == "b32" and "ld.global.b32" in ptx)
        assert "cvt.rn.f32" not in ptx  # no int -> float conversions in the decode

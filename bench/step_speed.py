"""Speed of one TWA coefficient step on the CPU (results: bench/RESULTS.md, "Coefficient step on the CPU").

    python bench/step_speed.py                 # full run (about two minutes), writes bench/step_speed.json
    python bench/step_speed.py --smoke-test    # tiny shapes, seconds

A step is: project a[k, l] = <B[k, l], g>, one SGD-momentum step on alpha, reconstruct
theta = c + sum_{k,l} alpha[k, l] B[k, l]. Three numbers per case, measured side by side in one
process (medians over rounds that visit every case in turn, so a busy machine slows all alike):

- reference: the published journal code's step -- codes unpacked one per uint8 byte in a list of
  per-block tensors, a Python loop over blocks that materializes float temporaries of every block
  (``(q.float() * (scale * g_l)).sum(1) + zero * g_l.sum()``, and the transposed broadcast-multiply-
  sum to rebuild theta, then + centre);
- step: twa_ray's ``project`` + SGD momentum + ``reconstruct`` on the packed bytes;
- floor: 2 x packed bytes / memory bandwidth (B must be read once per direction), the bandwidth
  being the higher of the read (sum) and copy medians, sampled between the steps;
- path: the kernel path the library chose on this CPU (``twa_ray.core.kernels.cpu.kernel_info``),
  and portable_ms: the same step forced to the portable C path (``TWA_RAY_KERNEL_PATH``);
- fp32_pair_ms: plain torch on the dequantized float32 B, ``B @ g`` and ``a @ B`` (no blocks: a
  lower bound of the unpacked approach);
- candidates that exist (4 bits): int4pack_ms, torch's grouped int4 GEMM for CPU
  (``aten._weight_int4pack_mm_for_cpu``, float32 activations, B packed in its own layout once per
  direction, one call per block and direction since scales are per (row, block)), and
  int8_act_pair_ms, a llama.cpp-style int8-activation GEMV pair (``torch._int_mm`` on one int8 code
  a byte; a lower bound: no per-group scales, no blocks), with the relative error of each
  against the float64 step (int8_act_rel_err: g and alpha rounded to int8 per group of 32);
- loaded: the step and the reference again while one competing CPU-bound process runs.

The "best" columns (fastest step against the best bandwidth sample) estimate an idle machine.

Cases: ResNet-20 (CIFAR, 0.27M parameters, one block per parameter tensor) and a 1M-parameter
model in 4 blocks of 250k, K = 100 candidates, b = 4 bits (b = 1, 2, 8 for information).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from twa_ray.core.kernels import cpu
from twa_ray.core.layout import Blocks
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import PackedMatrix, PackedMatrixBuilder, dequantize, unpack

THREADS = 2  # this machine's cores
LR, MOMENTUM = 0.01, 0.9


def resnet20_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of the CIFAR ResNet-20 (He et al. 2016, option-A shortcuts): 269,722."""
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("conv1.weight", (16, 3, 3, 3)),
        ("bn1.weight", (16,)),
        ("bn1.bias", (16,)),
    ]
    c_in = 16
    for stage, c in enumerate((16, 32, 64), start=1):
        for block in range(3):
            p = f"layer{stage}.{block}"
            shapes += [
                (f"{p}.conv1.weight", (c, c_in, 3, 3)),
                (f"{p}.bn1.weight", (c,)),
                (f"{p}.bn1.bias", (c,)),
                (f"{p}.conv2.weight", (c, c, 3, 3)),
                (f"{p}.bn2.weight", (c,)),
                (f"{p}.bn2.bias", (c,)),
            ]
            c_in = c
    return shapes + [("fc.weight", (10, 64)), ("fc.bias", (10,))]


def blocks_of(sizes: list[int], labels: list[str]) -> Blocks:
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return Blocks(tuple(bounds), tuple(labels))


def resnet20_blocks() -> Blocks:
    shapes = resnet20_shapes()
    return blocks_of([int(torch.Size(s).numel()) for _, s in shapes], [n for n, _ in shapes])


def build_basis(blocks: Blocks, num_rows: int, bits: int, seed: int = 0) -> PackedMatrix:
    """A packed K x D basis of normalized Gaussian candidate deltas, built row by row."""
    gen = torch.Generator().manual_seed(seed)
    builder = PackedMatrixBuilder(num_rows, blocks, bits)
    for k in range(num_rows):
        builder.set_row(k, torch.randn(blocks.numel, generator=gen))
    return builder.finish()


# ----------------------------------------------------------------------------- the two steps


class ReferenceStep:
    """The published step: one uint8 per code, per-block float temporaries, a Python loop."""

    def __init__(self, pm: PackedMatrix, center: torch.Tensor) -> None:
        self.bounds = pm.bounds
        self.codes, self.scales, self.zeros = [], [], []
        for blk, (a, b) in enumerate(zip(pm.bounds, pm.bounds[1:])):
            raw = pm.data[:, pm.byte_bounds[blk] : pm.byte_bounds[blk + 1]]
            # (K, n_l) uint8, one code a byte
            self.codes.append(unpack(raw, pm.bits, b - a).clone())
            self.scales.append(pm.scale[:, blk : blk + 1].clone())  # (K, 1)
            self.zeros.append(pm.zero[:, blk : blk + 1].clone())  # (K, 1)
        self.center = center
        self.alpha = torch.zeros(pm.num_rows, pm.num_blocks, requires_grad=True)
        self.opt = torch.optim.SGD(
            [self.alpha], lr=LR, momentum=MOMENTUM, foreach=False
        )  # one tensor: as twa_ray.core.optim

    @torch.no_grad()
    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        grads = []
        for blk, (a, b) in enumerate(zip(self.bounds, self.bounds[1:])):
            g_l = g[a:b]
            grads.append(
                (self.codes[blk].float() * (self.scales[blk] * g_l)).sum(dim=1)
                + self.zeros[blk][:, 0] * g_l.sum()
            )
        self.alpha.grad = torch.stack(grads, dim=1)
        self.opt.step()
        parts = []
        for blk in range(len(self.codes)):
            coef = self.alpha[:, blk : blk + 1] * self.scales[blk]  # (K, 1)
            parts.append(
                (self.codes[blk].float() * coef).sum(dim=0)
                + (self.alpha[:, blk] * self.zeros[blk][:, 0]).sum()
            )
        return torch.cat(parts) + self.center


class PackedStep:
    """twa_ray's step: project and reconstruct on the packed bytes, theta written in place."""

    def __init__(self, pm: PackedMatrix, center: torch.Tensor) -> None:
        self.pm, self.center = pm, center
        self.theta = torch.empty_like(center)
        self.alpha = torch.zeros(pm.num_rows, pm.num_blocks, requires_grad=True)
        self.opt = torch.optim.SGD(
            [self.alpha], lr=LR, momentum=MOMENTUM, foreach=False
        )  # one tensor: as twa_ray.core.optim

    @torch.no_grad()
    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        self.alpha.grad = project(self.pm, g)
        self.opt.step()
        return reconstruct(self.pm, self.alpha.detach(), self.center, out=self.theta)


@contextlib.contextmanager
def kernel_path(name: str) -> Iterator[None]:
    """Force the C kernel path ``name`` inside the block."""
    old = os.environ.get(cpu.ENV_PATH)
    os.environ[cpu.ENV_PATH] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ[cpu.ENV_PATH]
        else:
            os.environ[cpu.ENV_PATH] = old


class Fp32Pair:
    """Plain torch on the dequantized float32 B: ``B @ g`` and ``a @ B``."""

    def __init__(self, pm: PackedMatrix) -> None:
        self.B = dequantize(pm)
        self.a = torch.randn(pm.num_rows)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        self.B @ g
        return self.a @ self.B


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Int4PackStep:
    """The step on torch's grouped int4 GEMM for CPU (4 bits): B packed in its layout twice (rows
    x columns for project, transposed for reconstruct), per block, rows padded to 16 / 128 and
    columns to the group size. w = (q - 8) s + z, so z = zero + 8 scale reproduces B exactly."""

    def __init__(self, pm: PackedMatrix, center: torch.Tensor) -> None:
        K = pm.num_rows
        self.K, self.Kp, self.center, self.bounds = K, _round_up(K, 16), center, pm.bounds
        self.kin = _round_up(K, 128)
        self.proj, self.recon = [], []
        for blk, (a, b) in enumerate(zip(pm.bounds, pm.bounds[1:])):
            raw = pm.data[:, pm.byte_bounds[blk] : pm.byte_bounds[blk + 1]]
            q = unpack(raw, 4, b - a).to(torch.int32)  # (K, n)
            n = b - a
            gs = 32 if n <= 256 else 256
            npad = _round_up(n, gs)
            w = torch.full((self.Kp, npad), 8, dtype=torch.int32)
            w[:K, :n] = q
            sz = torch.zeros(npad // gs, self.Kp, 2)
            sz[:, :K, 0] = pm.scale[:, blk]
            sz[:, :K, 1] = pm.zero[:, blk] + 8 * pm.scale[:, blk]
            self.proj.append(
                (torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1), gs, sz, npad)
            )
            n16 = _round_up(n, 16)
            wt = torch.full((n16, self.kin), 8, dtype=torch.int32)
            wt[:n, :K] = q.t()
            szt = torch.zeros(1, n16, 2)
            szt[..., 0] = 1.0
            self.recon.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(wt, 1), szt))
        self.scale, self.zero = pm.scale, pm.zero
        self.alpha = torch.zeros(K, pm.num_blocks, requires_grad=True)
        self.opt = torch.optim.SGD([self.alpha], lr=LR, momentum=MOMENTUM, foreach=False)
        self.theta = torch.empty_like(center)

    @torch.no_grad()
    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        grads = []
        for (w, gs, sz, npad), a, b in zip(self.proj, self.bounds, self.bounds[1:]):
            x = torch.zeros(1, npad)
            x[0, : b - a] = g[a:b]
            grads.append(mm(x, w, gs, sz)[0, : self.K])
        self.alpha.grad = torch.stack(grads, dim=1)
        self.opt.step()
        coef = self.alpha.detach() * self.scale
        bias = (self.alpha.detach() * self.zero).sum(0)
        for blk, ((w, szt), a, b) in enumerate(zip(self.recon, self.bounds, self.bounds[1:])):
            x = torch.zeros(1, self.kin)
            x[0, : self.K] = coef[:, blk]
            y = mm(x, w, self.kin, szt)[0, : b - a]
            self.theta[a:b] = y + (8 * coef[:, blk].sum() + bias[blk]) + self.center[a:b]
        return self.theta


class Int8ActPair:
    """llama.cpp-style: int8 activations against int8 codes (``torch._int_mm``), the GEMV pair
    without the per-group scales (a lower bound of its time)."""

    def __init__(self, pm: PackedMatrix) -> None:
        codes = torch.cat(
            [
                unpack(pm.data[:, pm.byte_bounds[i] : pm.byte_bounds[i + 1]], pm.bits, b - a)
                for i, (a, b) in enumerate(zip(pm.bounds, pm.bounds[1:]))
            ],
            dim=1,
        )
        self.q = (codes.to(torch.int16) - (1 << (pm.bits - 1))).to(torch.int8)  # (K, D)
        self.qt = self.q.t().contiguous()
        self.g8 = torch.randint(-127, 128, (1, pm.numel), dtype=torch.int8)
        self.a8 = torch.randint(-127, 128, (1, _round_up(pm.num_rows, 8)), dtype=torch.int8)
        self.qp = torch.zeros(self.a8.shape[1], pm.numel, dtype=torch.int8)
        self.qp[: pm.num_rows] = self.q

    def __call__(self) -> None:
        torch._int_mm(self.g8, self.qt)
        torch._int_mm(self.a8, self.qp)


def int8_act_rel_err(pm: PackedMatrix, g: torch.Tensor, group: int = 32) -> float:
    """Relative error of project when g is rounded to int8 per group of ``group`` (llama.cpp
    Q8_0 activations), against the float64 projection."""
    B64 = dequantize(pm).double()
    g64 = g.double()
    n = _round_up(g.numel(), group)
    gp = torch.zeros(n, dtype=torch.float64)
    gp[: g.numel()] = g64
    blocks = gp.view(-1, group)
    step = blocks.abs().amax(1, keepdim=True).clamp_min(1e-300) / 127
    g8 = ((blocks / step).round() * step).view(-1)[: g.numel()]
    exact = torch.stack([B64[:, a:b] @ g64[a:b] for a, b in zip(pm.bounds, pm.bounds[1:])], 1)
    approx = torch.stack([B64[:, a:b] @ g8[a:b] for a, b in zip(pm.bounds, pm.bounds[1:])], 1)
    return float((approx - exact).norm() / exact.norm())


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call, in ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


class Bandwidth:
    """Memory bandwidth from a 256 MiB float32 buffer: a full read (sum) and a copy."""

    def __init__(self, numel: int) -> None:
        self.src = torch.ones(numel)
        self.dst = torch.empty(numel)
        self.read, self.copy = [], []  # GB/s samples

    def sample(self) -> None:
        nbytes = self.src.numel() * 4
        self.read.append(nbytes / timed(self.src.sum) / 1e6)
        self.copy.append(2 * nbytes / timed(lambda: self.dst.copy_(self.src)) / 1e6)  # read + write

    def gbps(self) -> float:
        """The higher of the read and copy medians (the stricter floor), measured under the
        same load as the steps."""
        return max(statistics.median(self.read), statistics.median(self.copy))

    def best_gbps(self) -> float:
        """The best sample: the bandwidth when nothing else competed for it."""
        return max(self.read + self.copy)


class Case:
    """One (model, bits) case: its packed basis, the steps and candidates, and their timings."""

    def __init__(
        self, name: str, blocks: Blocks, num_rows: int, bits: int, fp32: Fp32Pair | None = None
    ) -> None:
        self.name, self.blocks, self.num_rows, self.bits = name, blocks, num_rows, bits
        self.pm = build_basis(blocks, num_rows, bits)
        gen = torch.Generator().manual_seed(1)
        center = torch.randn(blocks.numel, generator=gen)
        self.g = torch.randn(blocks.numel, generator=gen) * 1e-3
        self.ref, self.ours = ReferenceStep(self.pm, center), PackedStep(self.pm, center)
        theta = self.ref(self.g)
        assert torch.allclose(theta, self.ours(self.g), rtol=1e-4, atol=1e-4), "steps disagree"
        self.fp32 = fp32 or Fp32Pair(self.pm)
        self.int4 = Int4PackStep(self.pm, center) if bits == 4 else None
        self.int8 = Int8ActPair(self.pm) if bits == 4 else None
        self.extra: dict[str, float] = {}
        if self.int4 is not None:
            delta = theta.double() - center.double()
            self.extra["int4pack_rel_diff"] = float(
                (self.int4(self.g).double() - center.double() - delta).norm() / delta.norm()
            )
            self.extra["int8_act_rel_err"] = int8_act_rel_err(self.pm, self.g)
        for _ in range(3):
            self.ours(self.g)
        self.ms: dict[str, list[float]] = {
            k: [] for k in ("reference", "step", "portable", "fp32_pair", "int4pack", "int8_act")
        }
        self.loaded: dict[str, list[float]] = {"reference": [], "step": []}

    def sample(self) -> None:
        self.ms["reference"].append(timed(lambda: self.ref(self.g)))
        self.ms["step"] += [timed(lambda: self.ours(self.g)) for _ in range(5)]
        with kernel_path("portable"):
            self.ms["portable"] += [timed(lambda: self.ours(self.g)) for _ in range(2)]
        self.ms["fp32_pair"] += [timed(lambda: self.fp32(self.g)) for _ in range(2)]
        if self.int4 is not None and self.int8 is not None:
            self.ms["int4pack"].append(timed(lambda: self.int4(self.g)))  # type: ignore[misc]
            self.ms["int8_act"].append(timed(self.int8))

    def sample_loaded(self) -> None:
        self.loaded["reference"].append(timed(lambda: self.ref(self.g)))
        self.loaded["step"] += [timed(lambda: self.ours(self.g)) for _ in range(5)]

    def result(self, bw: Bandwidth) -> dict:
        med = {k: statistics.median(v) if v else None for k, v in self.ms.items()}
        ref_med, step_med = med["reference"], med["step"]
        assert ref_med is not None and step_med is not None
        floor = 2 * self.pm.nbytes / (bw.gbps() * 1e9) * 1e3
        floor_best = 2 * self.pm.nbytes / (bw.best_gbps() * 1e9) * 1e3
        row = {
            "name": self.name,
            "cpu": cpu.cpu_model(),
            "path": cpu.kernel_info()["path"],
            "D": self.blocks.numel,
            "K": self.num_rows,
            "bits": self.bits,
            "L": self.blocks.num_blocks,
            "packed_MB": self.pm.nbytes / 1e6,
            "reference_ms": ref_med,
            "step_ms": step_med,
            "reference_min_ms": min(self.ms["reference"]),
            "step_min_ms": min(self.ms["step"]),
            "floor_ms": floor,
            "speedup_vs_reference": ref_med / step_med,
            "ratio_to_floor": step_med / floor,
            "floor_best_ms": floor_best,
            "ratio_to_floor_best": min(self.ms["step"]) / floor_best,
            "portable_ms": med["portable"],
            "fp32_pair_ms": med["fp32_pair"],
            "int4pack_ms": med["int4pack"],
            "int8_act_pair_ms": med["int8_act"],
            **self.extra,
        }
        if self.loaded["step"]:
            lref = statistics.median(self.loaded["reference"])
            lstep = statistics.median(self.loaded["step"])
            row["loaded"] = {
                "competitors": 1,
                "reference_ms": lref,
                "step_ms": lstep,
                "reference_slowdown": lref / ref_med,
                "step_slowdown": lstep / step_med,
            }
        return row


@contextlib.contextmanager
def competing_process() -> Iterator[None]:
    """One CPU-bound process (a Python busy loop) running while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


def train_step_ms(repeats: int) -> float | None:
    """ResNet-20 forward + backward on a CIFAR batch of 128 (for the step's share), if available."""
    try:
        from twa_ray.models import build_model
    except ImportError:
        return None
    model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def fwd_bwd() -> None:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    fwd_bwd()
    return statistics.median(timed(fwd_bwd) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="rounds over all cases")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("step_speed.json"))
    parser.add_argument("--smoke-test", action="store_true", help="tiny shapes, no JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)

    load_before = os.getloadavg()
    if args.smoke_test:
        cases = [Case("tiny 3 blocks", blocks_of([1000, 37, 5000], ["a", "b", "c"]), 8, 4)]
        bw, repeats = Bandwidth(1 << 20), 2
    else:
        big = blocks_of([250_000] * 4, [f"w{i}" for i in range(4)])
        shapes = (("resnet20", resnet20_blocks()), ("1M, 4 x 250k", big))
        cases, fp32 = [], {}  # one dequantized float32 B per shape (its speed ignores the bits)
        for bits in (4, 1, 2, 8):
            for name, blocks in shapes:
                cases.append(Case(name, blocks, 100, bits, fp32.get(name)))
                fp32[name] = cases[-1].fp32
        bw, repeats = Bandwidth(1 << 26), args.repeats
    # Rounds over all cases, so that a burst of load on a shared machine lands on one round of
    # every case rather than on all repeats of one case.
    for _ in range(repeats):
        for case in cases:
            case.sample()
            bw.sample()
    load_idle = os.getloadavg()
    with competing_process():
        for _ in range(max(2, repeats // 3)):
            for case in cases:
                case.sample_loaded()
    rows = [case.result(bw) for case in cases]
    fwd_bwd = None if args.smoke_test else train_step_ms(3)

    header = (
        f"{'case':<14}{'bits':>5}{'B MB':>7}{'reference ms':>14}{'step ms':>9}{'floor ms':>10}"
        f"{'speedup':>9}{'/ floor':>9}{'best / floor':>14}{'fp32 pair':>11}{'portable':>10}"
        f"{'int4pack':>10}{'int8 act':>10}{'loaded: step':>14}{'ref':>7}"
    )
    kinfo = cpu.kernel_info()
    print(f"CPU: {cpu.cpu_model()}; kernel path: {kinfo['path']} ({kinfo['chosen_by']})")
    print(header)
    print("-" * len(header))

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for r in rows:
        lo = r.get("loaded", {})
        print(
            f"{r['name']:<14}{r['bits']:>5}{r['packed_MB']:>7.1f}"
            f"{r['reference_ms']:>14.1f}{r['step_ms']:>9.2f}{r['floor_ms']:>10.2f}"
            f"{r['speedup_vs_reference']:>8.0f}x{r['ratio_to_floor']:>8.2f}x"
            f"{r['ratio_to_floor_best']:>13.2f}x{ms(r['fp32_pair_ms']):>11}"
            f"{ms(r['portable_ms']):>10}{ms(r['int4pack_ms']):>10}{ms(r['int8_act_pair_ms']):>10}"
            f"{lo.get('step_slowdown', 0):>13.2f}x{lo.get('reference_slowdown', 0):>6.2f}x"
        )
    for r in rows:
        if "int4pack_rel_diff" in r:
            print(
                f"{r['name']} 4 bits: int4pack step differs from ours by "
                f"{r['int4pack_rel_diff']:.1e} (relative); int8 activations err "
                f"{r['int8_act_rel_err']:.1e} relative on project"
            )
    read, copy = statistics.median(bw.read), statistics.median(bw.copy)
    print(
        f"\nmedians over {repeats} rounds; bandwidth medians: read {read:.1f} GB/s, copy "
        f"(read + write) {copy:.1f} GB/s, floor at {bw.gbps():.1f} GB/s. 'best': the fastest step "
        f"against the best bandwidth sample ({bw.best_gbps():.1f} GB/s), i.e. an idle machine. "
        f"{THREADS} threads; load average (1 min) before {load_before[0]:.1f}, after the idle "
        f"rounds {load_idle[0]:.1f}. 'loaded': slowdown with one competing busy process."
    )
    if fwd_bwd is not None:
        step = next(r["step_ms"] for r in rows if r["name"] == "resnet20" and r["bits"] == 4)
        print(
            f"resnet20 forward + backward (batch 128): {fwd_bwd:.0f} ms; the 4-bit coefficient "
            f"step adds {step:.2f} ms ({100 * step / (fwd_bwd + step):.1f}% of a TWA training step)"
        )
    if not args.smoke_test:
        result = {
            "cases": rows,
            "bandwidth_GBps": bw.gbps(),
            "best_bandwidth_GBps": bw.best_gbps(),
            "read_GBps_median": read,
            "copy_GBps_median": copy,
            "threads": THREADS,
            "resnet20_fwd_bwd_ms": fwd_bwd,
            "load_average": load_idle[0],
            "load_average_before": load_before[0],
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu": cpu.cpu_model(),
            "kernel": kinfo,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

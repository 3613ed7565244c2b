"""Speed of one TWA coefficient step on the CPU (BENCHMARKS.md, section B).

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
  being the higher of the read (sum) and copy medians, sampled between the steps.

The "best" columns (fastest step against the best bandwidth sample) estimate an idle machine.

Cases: ResNet-20 (CIFAR, 0.27M parameters, one block per parameter tensor) and a 1M-parameter
model in 4 blocks of 250k, K = 100 candidates, b = 4 bits (b = 1, 2, 8 for information).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from twa_ray.core.layout import Blocks
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import PackedMatrix, PackedMatrixBuilder, unpack

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
        self.opt = torch.optim.SGD([self.alpha], lr=LR, momentum=MOMENTUM, foreach=False)  # one tensor: as twa_ray.core.optim

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
        self.opt = torch.optim.SGD([self.alpha], lr=LR, momentum=MOMENTUM, foreach=False)  # one tensor: as twa_ray.core.optim

    @torch.no_grad()
    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        self.alpha.grad = project(self.pm, g)
        self.opt.step()
        return reconstruct(self.pm, self.alpha.detach(), self.center, out=self.theta)


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
    """One (model, bits) case: its packed basis, both steps and their timings."""

    def __init__(self, name: str, blocks: Blocks, num_rows: int, bits: int) -> None:
        self.name, self.blocks, self.num_rows, self.bits = name, blocks, num_rows, bits
        self.pm = build_basis(blocks, num_rows, bits)
        gen = torch.Generator().manual_seed(1)
        center = torch.randn(blocks.numel, generator=gen)
        self.g = torch.randn(blocks.numel, generator=gen) * 1e-3
        self.ref, self.ours = ReferenceStep(self.pm, center), PackedStep(self.pm, center)
        same = torch.allclose(self.ref(self.g), self.ours(self.g), rtol=1e-4, atol=1e-4)
        assert same, "the two steps disagree"  # same math, same first step
        for _ in range(3):
            self.ours(self.g)
        self.ref_ms: list[float] = []
        self.step_ms: list[float] = []

    def sample(self) -> None:
        self.ref_ms.append(timed(lambda: self.ref(self.g)))
        self.step_ms += [timed(lambda: self.ours(self.g)) for _ in range(5)]

    def result(self, bw: Bandwidth) -> dict:
        ref_med, step_med = statistics.median(self.ref_ms), statistics.median(self.step_ms)
        floor = 2 * self.pm.nbytes / (bw.gbps() * 1e9) * 1e3
        floor_best = 2 * self.pm.nbytes / (bw.best_gbps() * 1e9) * 1e3
        return {
            "name": self.name,
            "D": self.blocks.numel,
            "K": self.num_rows,
            "bits": self.bits,
            "L": self.blocks.num_blocks,
            "packed_MB": self.pm.nbytes / 1e6,
            "reference_ms": ref_med,
            "step_ms": step_med,
            "reference_min_ms": min(self.ref_ms),
            "step_min_ms": min(self.step_ms),
            "floor_ms": floor,
            "speedup_vs_reference": ref_med / step_med,
            "ratio_to_floor": step_med / floor,
            "floor_best_ms": floor_best,
            "ratio_to_floor_best": min(self.step_ms) / floor_best,
        }


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

    if args.smoke_test:
        cases = [Case("tiny 3 blocks", blocks_of([1000, 37, 5000], ["a", "b", "c"]), 8, 4)]
        bw, repeats = Bandwidth(1 << 20), 2
    else:
        big = blocks_of([250_000] * 4, [f"w{i}" for i in range(4)])
        cases = [
            Case(name, blocks, 100, bits)
            for bits in (4, 1, 2, 8)
            for name, blocks in (("resnet20", resnet20_blocks()), ("1M, 4 x 250k", big))
        ]
        bw, repeats = Bandwidth(1 << 26), args.repeats
    # Rounds over all cases, so that a burst of load on a shared machine lands on one round of
    # every case rather than on all repeats of one case.
    for _ in range(repeats):
        for case in cases:
            case.sample()
            bw.sample()
    rows = [case.result(bw) for case in cases]
    fwd_bwd = None if args.smoke_test else train_step_ms(3)

    header = (
        f"{'case':<14}{'D':>9}{'K':>5}{'bits':>5}{'B MB':>7}{'reference ms':>14}"
        f"{'step ms':>9}{'floor ms':>10}{'speedup':>9}{'/ floor':>9}{'| best: step':>13}"
        f"{'floor':>7}{'/ floor':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:<14}{r['D']:>9}{r['K']:>5}{r['bits']:>5}{r['packed_MB']:>7.1f}"
            f"{r['reference_ms']:>14.1f}{r['step_ms']:>9.2f}{r['floor_ms']:>10.2f}"
            f"{r['speedup_vs_reference']:>8.0f}x{r['ratio_to_floor']:>8.2f}x"
            f"{r['step_min_ms']:>13.2f}{r['floor_best_ms']:>7.2f}{r['ratio_to_floor_best']:>8.2f}x"
        )
    read, copy = statistics.median(bw.read), statistics.median(bw.copy)
    print(
        f"\nmedians over {repeats} rounds; bandwidth medians: read {read:.1f} GB/s, copy "
        f"(read + write) {copy:.1f} GB/s, floor at {bw.gbps():.1f} GB/s. 'best': the fastest step "
        f"against the best bandwidth sample ({bw.best_gbps():.1f} GB/s), i.e. an idle machine. "
        f"{THREADS} threads, load average {os.getloadavg()[0]:.1f}"
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
            "load_average": os.getloadavg()[0],
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

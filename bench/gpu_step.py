"""The TWA coefficient step on packed low-bit B, on one GPU (results: bench/RESULTS.md, "GPU").

    python bench/gpu_step.py gpu_step.json          # CUDA machine: resnet18 + vit_b_32, b=4 and b=1
    python bench/gpu_step.py tiny.json --tiny       # CPU smoke test: triton interpreter, tiny shapes

For each model (its parameter shapes, one block per tensor) and bits it builds random packed
codes on the device with realistic scales and zero points, then measures

- our step: ``project_triton`` + SGD-momentum on alpha + ``reconstruct_triton`` (CUDA events,
  median), for the default launch shapes and a few others (the best is reported);
- the reference step (the paper's published implementation, b=4 only): codes unpacked one per uint8 byte in a list
  of per-block tensors, a Python loop over blocks with float temporaries;
- the copy bandwidth (2 x bytes / time of a large copy) and the floor 2 x packed bytes / bandwidth;
- a bf16 forward + backward + SGD step of the model (resnet18 batch 256, vit_b_32 batch 128 at
  224x224) and the coefficient step's share of it;
- the error of both kernels against a float64 reference (unpacked in torch, block by block).

Imports only torch, triton and ``twa_ray/core/kernels/triton_packed.py`` (loaded from its file,
with ``twa_ray.core.quant`` for the row alignment): Ray and pyarrow need not be installed. Writes JSON to
``argv[1]`` and prints a table. Each case's failure is recorded in the JSON, not raised.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "twa_ray" / "core" / "kernels" / "triton_packed.py"


def load_kernels() -> ModuleType:
    """``triton_packed`` from its file (it imports ``twa_ray.core.quant``: torch and numpy only)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("twa_triton_packed", KERNELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- models
# torchvision's resnet18 and vit_b_32, rebuilt here (torchvision may be absent) with the same
# parameters in the same order: 11,689,512 and 88,224,232 of them.


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin, stages = width, []
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens: int, dim: int, depth: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.Sequential(*(EncoderBlock(dim, heads, mlp) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class ViT(nn.Module):
    def __init__(
        self,
        image: int = 224,
        patch: int = 32,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp: int = 3072,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.encoder = Encoder((image // patch) ** 2 + 1, dim, depth, heads, mlp)
        self.heads = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, tokens - 1, dim)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


# name -> (model factory, K, batch, image size); --tiny shrinks everything
MODELS: dict[str, tuple[Callable[[], nn.Module], int, int, int]] = {
    "resnet18": (ResNet18, 100, 256, 224),
    "vit_b_32": (ViT, 72, 128, 224),
}
TINY: dict[str, tuple[Callable[[], nn.Module], int, int, int]] = {  # interpreter-sized
    "resnet18": (lambda: ResNet18(width=2, num_classes=10), 3, 2, 32),
    "vit_b_32": (
        lambda: ViT(image=16, patch=8, dim=8, depth=1, heads=2, mlp=16, num_classes=10),
        3,
        2,
        16,
    ),
}


# ----------------------------------------------------------------------------- timing


def timeit(fn: Callable[[], object], *, iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a large device copy, counting read + write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timeit(
        lambda: dst.copy_(src), iters=10 if device.type == "cuda" else 3, warmup=2, device=device
    )
    return 2 * nbytes / (ms * 1e-3)


# ----------------------------------------------------------------------------- packed B


class Packed:
    """Random packed b-bit codes of a K x D matrix cut into blocks, plus scale / zero."""

    def __init__(
        self,
        sizes: list[int],
        K: int,
        bits: int,
        device: torch.device,
        seed: int,
        *,
        aligned: bool = True,
    ) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        self.bits, self.K, self.sizes = bits, K, sizes
        self.bounds, self.byte_bounds = [0], [0]
        for n in sizes:
            self.bounds.append(self.bounds[-1] + n)
            self.byte_bounds.append(self.byte_bounds[-1] + -(-n * bits // 8))
        nbytes = self.byte_bounds[-1]
        # aligned: row stride padded to 16 bytes (the vector-load path); else an odd stride
        stride = -(-nbytes // 16) * 16 if aligned else nbytes + 1
        buf = torch.randint(0, 256, (K, stride), dtype=torch.uint8, device=device, generator=gen)
        self.codes = buf[:, :nbytes] if aligned else buf[:, 1:]
        # min/max code of unit-norm block rows (the affine variant): entries ~ N(0, 1/n)
        n = torch.tensor(sizes, dtype=torch.float32, device=device).clamp_min(2)
        half = torch.sqrt(2 * torch.log(n)) / torch.sqrt(n)  # ~ max |entry|
        u = torch.rand(2, K, len(sizes), device=device, generator=gen) * 0.4 + 0.8
        self.zero = (-half * u[0]).contiguous()
        self.scale = (2 * half * u[1] / ((1 << bits) - 1)).contiguous()

    @property
    def nbytes(self) -> int:
        return self.K * self.byte_bounds[-1]

    def unpack_block(self, i: int) -> torch.Tensor:
        """Codes of block i as uint8 ``(K, n_l)``, one per byte."""
        raw = self.codes[:, self.byte_bounds[i] : self.byte_bounds[i + 1]]
        per = 8 // self.bits
        shifts = torch.arange(0, 8, self.bits, dtype=torch.uint8, device=raw.device)
        q = (raw.unsqueeze(-1) >> shifts) & ((1 << self.bits) - 1)  # (K, nb, 8/b)
        return q.reshape(self.K, raw.shape[1] * per)[:, : self.sizes[i]]


def reference64(
    pk: Packed, g: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``a = B g`` (K, L) and ``sum alpha B`` (D,), block by block (bounded memory)."""
    a = torch.empty(pk.K, len(pk.sizes), dtype=torch.float64, device=g.device)
    theta = torch.empty(g.numel(), dtype=torch.float64, device=g.device)
    for i, (s, e) in enumerate(zip(pk.bounds, pk.bounds[1:])):
        B = (
            pk.scale[:, i : i + 1].double() * pk.unpack_block(i).double()
            + pk.zero[:, i : i + 1].double()
        )
        a[:, i] = B @ g[s:e].double()
        theta[s:e] = alpha[:, i].double() @ B
        del B
    return a, theta


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def reference_step(
    qs: list[torch.Tensor],
    pk: Packed,
    g: torch.Tensor,
    alpha: torch.Tensor,
    buf: torch.Tensor,
    centre: torch.Tensor,
    lr: float,
    momentum: float,
) -> torch.Tensor:
    """The published step (the paper's implementation): unpacked codes, float temporaries, a Python loop."""
    grads = []
    for i, q in enumerate(qs):
        gb = g[pk.bounds[i] : pk.bounds[i + 1]]
        grads.append(
            (q.float() * (pk.scale[:, i : i + 1] * gb)).sum(dim=1) + pk.zero[:, i] * gb.sum()
        )
    a = torch.stack(grads, dim=1)
    buf.mul_(momentum).add_(a)
    alpha.sub_(lr * buf)
    parts = []
    for i, q in enumerate(qs):
        w = alpha[:, i : i + 1]
        parts.append(
            (q.float() * (w * pk.scale[:, i : i + 1])).sum(dim=0) + (w[:, 0] * pk.zero[:, i]).sum()
        )
    return torch.cat(parts) + centre


# ----------------------------------------------------------------------------- cases


def sweep_configs(tp: ModuleType, bits: int, tiny: bool) -> tuple[list, list]:
    """Launch shapes tried for project and reconstruct (the default first)."""
    C = tp.KernelConfig
    if tiny:
        return [tp.default_config(bits, "project")], [tp.default_config(bits, "reconstruct")]
    if bits == 1:
        proj = [C(64, 8, 4, 4), C(64, 16, 4, 4), C(128, 16, 8, 4), C(64, 32, 4, 4)]
        rec = [C(64, 8, 4, 4), C(64, 16, 4, 4), C(128, 8, 8, 4), C(128, 16, 8, 8)]
    else:
        v = 16 if bits >= 4 else 8
        proj = [C(256, 8, v, 4), C(256, 16, v, 4), C(512, 16, v, 8), C(256, 32, v, 4)]
        rec = [C(256, 8, v, 4), C(256, 16, v, 4), C(512, 8, v, 4), C(512, 16, v, 8)]
    dp, dr = tp.default_config(bits, "project"), tp.default_config(bits, "reconstruct")
    return [dp] + [c for c in proj if c != dp], [dr] + [c for c in rec if c != dr]


def run_case(
    tp: ModuleType,
    model: str,
    sizes: list[int],
    K: int,
    bits: int,
    bw: float,
    device: torch.device,
    args: argparse.Namespace,
    deadline: float,
) -> dict:
    iters, warmup = (1, 0) if args.tiny else (30, 3)
    pk = Packed(sizes, K, bits, device, seed=bits)
    D, L = pk.bounds[-1], len(sizes)
    gen = torch.Generator(device=device).manual_seed(7)
    g = torch.randn(D, device=device, generator=gen) * 1e-3
    centre = torch.randn(D, device=device, generator=gen) * 0.05
    alpha0 = torch.randn(K, L, device=device, generator=gen) * 0.01
    floor_ms = 2 * pk.nbytes / bw * 1e3
    row: dict = {
        "model": model,
        "bits": bits,
        "D": D,
        "K": K,
        "L": L,
        "packed_bytes": pk.nbytes,
        "bandwidth_GBps": bw / 1e9,
        "floor_ms": floor_ms,
        "device": args.device_name,
    }
    args_pk = (pk.codes, bits, pk.bounds, pk.byte_bounds, pk.scale, pk.zero)

    # correctness against float64 (sum alpha B without the centre: the stricter comparison)
    a = tp.project_triton(*args_pk, g)
    theta = tp.reconstruct_triton(*args_pk, alpha0, None)
    a_ref, theta_ref = reference64(pk, g, alpha0)
    row["max_rel_err_project"] = rel_err(a, a_ref)
    row["max_rel_err_reconstruct"] = rel_err(theta, theta_ref)
    row["max_rel_err"] = max(row["max_rel_err_project"], row["max_rel_err_reconstruct"])
    del a, theta, a_ref, theta_ref

    # each kernel alone over a few launch shapes
    proj_cfgs, rec_cfgs = sweep_configs(tp, bits, args.tiny)
    out = torch.empty(D, device=device)
    timings: dict[str, dict[str, float]] = {"project": {}, "reconstruct": {}}
    for name, cfgs, call in (
        ("project", proj_cfgs, lambda c: tp.project_triton(*args_pk, g, config=c)),
        (
            "reconstruct",
            rec_cfgs,
            lambda c: tp.reconstruct_triton(*args_pk, alpha0, centre, out, config=c),
        ),
    ):
        for i, cfg in enumerate(cfgs):
            if i > 0 and time.monotonic() > deadline:
                break  # keep the default; skip the sweep when short of time
            key = f"{cfg.tile_bytes}x{cfg.rows}/v{cfg.vec}/w{cfg.num_warps}"
            try:
                timings[name][key] = timeit(
                    functools.partial(call, cfg), iters=iters, warmup=warmup, device=device
                )
            except Exception as e:  # a shape that does not compile here: record, go on
                timings[name][key] = float("nan")
                row.setdefault("config_errors", []).append(f"{name} {key}: {e!r}"[:300])
    best_p = min(
        zip(timings["project"].values(), proj_cfgs), key=lambda t: (math.isnan(t[0]), t[0])
    )[1]
    best_r = min(
        zip(timings["reconstruct"].values(), rec_cfgs), key=lambda t: (math.isnan(t[0]), t[0])
    )[1]
    row["project_ms_by_config"], row["reconstruct_ms_by_config"] = (
        timings["project"],
        timings["reconstruct"],
    )
    row["best_project_config"] = vars(best_p) if hasattr(best_p, "__dict__") else str(best_p)
    row["best_reconstruct_config"] = vars(best_r) if hasattr(best_r, "__dict__") else str(best_r)

    # the whole step: project + SGD momentum on alpha + reconstruct into the parameter vector
    alpha, buf, lr, momentum = alpha0.clone(), torch.zeros_like(alpha0), 0.1, 0.9

    def step(pc=None, rc=None, codes=pk.codes) -> None:
        a = tp.project_triton(codes, *args_pk[1:], g, config=pc)
        buf.mul_(momentum).add_(a)
        alpha.add_(buf, alpha=-lr)
        tp.reconstruct_triton(codes, *args_pk[1:], alpha, centre, out, config=rc)

    row["step_ms_default"] = timeit(step, iters=iters, warmup=warmup, device=device)
    row["step_ms"] = row["step_ms_default"]
    if (best_p, best_r) != (proj_cfgs[0], rec_cfgs[0]):
        row["step_ms"] = timeit(
            lambda: step(best_p, best_r), iters=iters, warmup=warmup, device=device
        )
    row["project_ms"] = timings["project"][
        next(k for k, c in zip(timings["project"], proj_cfgs) if c == best_p)
    ]
    row["reconstruct_ms"] = timings["reconstruct"][
        next(k for k, c in zip(timings["reconstruct"], rec_cfgs) if c == best_r)
    ]
    row["ratio_to_floor"] = row["step_ms"] / floor_ms

    if bits == 4 and model == "resnet18" and time.monotonic() < deadline:
        # the masked path: codes whose row stride is not a multiple of 16 bytes
        odd = Packed(sizes, K, bits, device, seed=bits, aligned=False)
        row["step_ms_unaligned"] = timeit(
            lambda: step(codes=odd.codes), iters=iters, warmup=warmup, device=device
        )
        del odd

    # the reference step (b=4 only): codes one per byte, list of per-block tensors
    row["reference_ms"] = None
    row["speedup_vs_reference"] = None
    if bits == 4 and not args.no_reference:
        qs = [pk.unpack_block(i).contiguous() for i in range(L)]
        alpha_r, buf_r = alpha0.clone(), torch.zeros_like(alpha0)
        ref_iters = 2 if args.tiny else 5
        row["reference_ms"] = timeit(
            lambda: reference_step(qs, pk, g, alpha_r, buf_r, centre, lr, momentum),
            iters=ref_iters,
            warmup=1,
            device=device,
        )
        row["speedup_vs_reference"] = row["reference_ms"] / row["step_ms"]
        del qs
    return row


def small_checks(tp: ModuleType, device: torch.device, tiny: bool) -> list[dict]:
    """Both kernels on odd block sizes for every bits and both load paths, against float64."""
    sizes = [1, 7, 64, 333, 1000, 5, 130] + ([] if tiny else [2049, 100_003])
    rows = []
    for bits in (1, 2, 4, 8):
        for aligned in (True, False):
            pk = Packed(sizes, 13, bits, device, seed=10 + bits, aligned=aligned)
            D = pk.bounds[-1]
            gen = torch.Generator(device=device).manual_seed(bits)
            g = torch.randn(D, device=device, generator=gen)
            if bits == 2:  # bfloat16 gradients once
                g = g.to(torch.bfloat16)
            alpha = torch.randn(13, len(sizes), device=device, generator=gen)
            origin = torch.randn(D, device=device, generator=gen)
            args = (pk.codes, bits, pk.bounds, pk.byte_bounds, pk.scale, pk.zero)
            a_ref, theta_ref = reference64(pk, g.float(), alpha)
            a = tp.project_triton(*args, g)
            theta = tp.reconstruct_triton(*args, alpha, origin)
            rows.append(
                {
                    "bits": bits,
                    "aligned": aligned,
                    "g_dtype": str(g.dtype),
                    "rel_err_project": rel_err(a, a_ref),
                    "rel_err_reconstruct": rel_err(theta, theta_ref + origin.double()),
                }
            )
    return rows


def train_step_ms(model: str, table: dict, device: torch.device, tiny: bool) -> float:
    """Median ms of a bf16 autocast forward + backward + SGD step at the benchmark's batch size."""
    factory, _, batch, image = table[model]
    net = factory().to(device)
    if model == "resnet18":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, image, image, device=device)
    if model == "resnet18":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timeit(step, iters=2 if tiny else 10, warmup=1 if tiny else 3, device=device)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON output path")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes; CPU + triton interpreter when no GPU"
    )
    parser.add_argument("--models", default="resnet18,vit_b_32")
    parser.add_argument("--bits", default="4,1")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference step")
    parser.add_argument("--no-checks", action="store_true", help="skip the small-shape checks")
    parser.add_argument(
        "--budget-s", type=float, default=200.0, help="skip config sweeps after this"
    )
    args = parser.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.tiny:
            print("no CUDA device: use --tiny for the CPU smoke test", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by the kernels)
    tp = load_kernels()
    if not tp.available():
        print("triton kernels cannot run here (is triton installed?)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    args.device_name = torch.cuda.get_device_name() if cuda else "cpu (triton interpreter)"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    table = TINY if args.tiny else MODELS

    bw = copy_bandwidth(device, (1 << 20) if args.tiny else (2 << 30))
    print(f"device: {args.device_name}  copy bandwidth: {bw / 1e9:.1f} GB/s", flush=True)
    result: dict = {
        "device": args.device_name,
        "copy_bandwidth_GBps": bw / 1e9,
        "cases": [],
        "torch": torch.__version__,
        "triton": _triton_version(),
    }
    for model in args.models.split(","):
        factory, K, _, _ = table[model]
        sizes = [p.numel() for p in factory().parameters()]
        rows = []
        for bits in (int(b) for b in args.bits.split(",")):
            t0 = time.monotonic()
            try:
                row = run_case(tp, model, sizes, K, bits, bw, device, args, deadline)
            except Exception as e:
                row = {
                    "model": model,
                    "bits": bits,
                    "device": args.device_name,
                    "error": f"{e!r}"[:2000],
                    "traceback": traceback.format_exc()[-4000:],
                }
                print(f"{model} b={bits}: FAILED {e!r}", flush=True)
            row["case_seconds"] = time.monotonic() - t0
            rows.append(row)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        try:
            train_ms: float | None = train_step_ms(model, table, device, args.tiny)
        except Exception as e:
            train_ms = None
            for row in rows:
                row["train_step_error"] = f"{e!r}"[:1000]
        for row in rows:
            row["train_step_ms"] = train_ms
            step = row.get("step_ms")
            row["share_of_train_step"] = step / train_ms if step is not None and train_ms else None
        result["cases"].extend(rows)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if not args.no_checks and (args.tiny or time.monotonic() < t_start + args.budget_s + 20):
        try:
            result["small_checks"] = small_checks(tp, device, args.tiny)
            worst = max(
                max(r["rel_err_project"], r["rel_err_reconstruct"]) for r in result["small_checks"]
            )
            result["small_checks_max_rel_err"] = worst
            print(f"small checks (bits 1/2/4/8 x both load paths): max rel err {worst:.1e}")
        except Exception as e:
            result["small_checks_error"] = f"{e!r}"[:2000]
            print(f"small checks FAILED: {e!r}", flush=True)
    result["total_seconds"] = time.monotonic() - t_start
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    return 0


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def print_table(result: dict) -> None:
    cols = [
        ("model", "{}"),
        ("bits", "{}"),
        ("step_ms", "{:.3f}"),
        ("floor_ms", "{:.3f}"),
        ("ratio_to_floor", "{:.2f}"),
        ("project_ms", "{:.3f}"),
        ("reconstruct_ms", "{:.3f}"),
        ("step_ms_default", "{:.3f}"),
        ("reference_ms", "{:.2f}"),
        ("speedup_vs_reference", "{:.0f}"),
        ("train_step_ms", "{:.2f}"),
        ("share_of_train_step", "{:.3f}"),
        ("max_rel_err", "{:.1e}"),
    ]
    print(" | ".join(name for name, _ in cols))
    for row in result["cases"]:
        cells = []
        for name, fmt in cols:
            v = row.get(name)
            cells.append("-" if v is None else fmt.format(v))
        line = " | ".join(cells)
        if "error" in row:
            line += f"  ERROR {row['error'][:200]}"
        print(line)
    print(
        f"device {result['device']}; copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s; "
        f"total {result['total_seconds']:.0f} s"
    )


if __name__ == "__main__":
    sys.exit(main())

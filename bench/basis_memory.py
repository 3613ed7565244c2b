"""Basis placement: bytes of B per coefficient worker, bytes on the wire, step time (issue 13).

    python bench/basis_memory.py                      # CPU: bench/basis_memory.json, < 10 min on 2 cores
    python bench/basis_memory.py --device cuda --out bench/basis_memory_gpu.json   # one GPU, no Ray

A ResNet-18-sized subspace (D = 11,689,512, K = 50 candidates, 4-bit codes: B = 292 MB) with
uniform blocks of 2^16 columns, cut into ~64 shards as ``put_subspace`` does for a shardable
placement. For W = 1, 2, 4 coefficient workers (spawned processes over gloo, one thread each) and
both placements, each worker copies what it holds of B from a memory-mapped file (as a worker
``ray.get``\\ s its shards or copies them to its GPU), then runs the coefficient step of
:mod:`twa_ray.core.placement` on a synthetic gradient per worker and step: ``mean_grad``, an SGD
momentum step on alpha, ``reconstruct``. Reported per case: B held per worker (tensor bytes;
``rss_delta_bytes``: the resident-memory growth, B plus the worker's columns of the origin), bytes sent per step per worker, the median
step time, and the largest relative difference of the final alpha from replicate's with the
same W. With ``--device cuda`` all W processes share the one GPU (gloo moves the CUDA tensors).

Also reported (``resnet18_layer_blocks``): with ResNet-18's own tensors as blocks the largest
worker share of B, whole blocks per worker, is bounded by its largest layers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import ROOT, cpu_model, free_port, markdown_table, write_json

from twa_ray.core.layout import Blocks  # noqa: E402
from twa_ray.core.optim import make_optimizer  # noqa: E402
from twa_ray.core.placement import ShardedBasis, balanced_bounds, place  # noqa: E402
from twa_ray.core.quant import PackedMatrix, packed_size  # noqa: E402

D = 11_689_512  # torchvision resnet18 parameters
K = 50
BITS = 4
BLOCK = 1 << 16
SHARDS = 64
RESNET18_TENSORS = [  # torchvision resnet18 parameter sizes, in order (62 tensors)
    9408,
    64,
    64,
    *[36864, 64, 64] * 4,
    73728,
    128,
    128,
    147456,
    128,
    128,
    8192,
    128,
    128,
    147456,
    128,
    128,
    147456,
    128,
    128,
    294912,
    256,
    256,
    589824,
    256,
    256,
    32768,
    256,
    256,
    589824,
    256,
    256,
    589824,
    256,
    256,
    1179648,
    512,
    512,
    2359296,
    512,
    512,
    131072,
    512,
    512,
    2359296,
    512,
    512,
    2359296,
    512,
    512,
    512000,
    1000,
]


def _blocks(numel: int, width: int) -> Blocks:
    bounds = (*range(0, numel, width), numel)
    return Blocks(tuple(bounds), tuple(f"b{i}" for i in range(len(bounds) - 1)))


def write_basis(path: Path, numel: int, rows: int) -> dict:
    """Random 4-bit codes, scales and zeros of an (rows, numel) B; the codes go to ``path``
    (np.save, memory-mapped by the workers). Returns the metadata."""
    blocks = _blocks(numel, BLOCK)
    gen = np.random.default_rng(0)
    nbytes = sum(packed_size(b - a, BITS) for a, b in zip(blocks.bounds, blocks.bounds[1:]))
    codes = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, nbytes))
    for r in range(rows):
        codes[r] = gen.integers(0, 256, nbytes, dtype=np.uint8)
    codes.flush()
    del codes
    scale = gen.uniform(1e-4, 2e-4, (rows, blocks.num_blocks)).astype(np.float32)
    zero = -7.5 * scale
    return {"bounds": blocks.bounds, "scale": scale, "zero": zero}


def _trim() -> None:
    """Return freed heap to the OS (the previous placement's copy), so RSS growth is this case's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, world: int, port: int, kind: str, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device(args["device"])
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    warnings.filterwarnings("ignore", message=".*not writable.*")  # B is only read
    try:
        try:
            res = _case(kind, rank, world, device, args)
        except Exception as e:  # recorded, not raised: the other cases still run
            res = {"error": repr(e)[:2000], "traceback": traceback.format_exc()[-3000:]}
        torch.save(res, os.path.join(out, f"{kind}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _case(kind: str, rank: int, world: int, device: torch.device, args: dict) -> dict:
    meta = torch.load(args["meta"], weights_only=True)
    codes = np.load(args["codes"], mmap_mode="r")
    rows, numel = codes.shape[0], meta["bounds"][-1]
    # the full B as zero-copy views of the memory map; a worker copies only what it holds
    full = PackedMatrix(
        bits=BITS,
        num_rows=rows,
        bounds=meta["bounds"],
        data=torch.from_numpy(codes),
        byte_bounds=tuple(
            np.cumsum(
                [0, *[packed_size(b - a, BITS) for a, b in zip(meta["bounds"], meta["bounds"][1:])]]
            ).tolist()
        ),
        scale=meta["scale"],
        zero=meta["zero"],
    )
    origin = torch.zeros(numel)  # kept: RSS growth = the copy of B and of this worker's origin
    sub = SimpleNamespace(
        basis=ShardedBasis.split(full, meta["shard_bounds"]),
        origin=origin,
        alpha0=torch.zeros(rows, full.num_blocks),
    )
    _trim()
    rss0 = _rss()
    view = place(sub, kind, rank=rank, world=world)  # type: ignore[arg-type]
    # the copy a worker makes of what it holds: PackedMatrix.to, rows padded (as on a GPU)
    basis = ShardedBasis(
        [pm.to(device, pad=True) for pm in view.basis.shards], view.basis.block_bounds
    )
    held = replace(
        view, basis=basis, origin=view.origin.to(device).clone(), alpha0=view.alpha0.to(device)
    )
    del view, sub, full, codes  # unmap the file: RSS counts the copy only
    gc.collect()
    rss = _rss() - rss0
    alpha = held.alpha0.clone()
    opt, sched = make_optimizer(
        alpha,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=0.0,
        total_steps=args["steps"],
        schedule="constant",
    )
    theta = torch.empty(numel, device=device)
    times = []
    for step in range(args["steps"] + 1):  # step 0: warm-up, not timed
        gen = torch.Generator().manual_seed(1000 * step + rank)
        g = (torch.randn(numel, generator=gen) * 1e-2).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        alpha.grad = held.mean_grad(g)
        opt.step()
        sched.step()
        held.reconstruct(alpha, out=theta)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del origin
    return {
        "held_bytes": held.held_bytes,
        "rss_delta_bytes": rss,
        "wire_bytes_per_step": held.wire_bytes_per_step,
        "step_ms": 1e3 * statistics.median(times[1:]),
        "alpha": alpha.detach().cpu(),
    }


def run_world(world: int, args: dict) -> dict[str, list[dict]]:
    """Both placements on ``world`` spawned workers (fresh processes for each: clean RSS):
    ``{placement: [result of each rank]}``."""
    results = {}
    for kind in ("replicate", "shard"):
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_worker, args=(world, free_port(), kind, args, out), nprocs=world, join=True)
            results[kind] = [
                torch.load(os.path.join(out, f"{kind}{r}.pt"), weights_only=True)
                for r in range(world)
            ]
    return results


def _max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (a.double() - ref.double()).abs()
    scale = ref.double().abs()
    rel = torch.where(scale > 0, diff / scale.clamp_min(1e-300), diff)
    return float(rel.max())


def layer_block_shares(workers: list[int]) -> dict:
    """Largest worker share of B over B / W with ResNet-18's tensors as blocks (and 'size:16384')."""
    shares = {}
    for w in workers:
        sizes = RESNET18_TENSORS
        bounds = balanced_bounds(sizes, w)
        largest = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
        shares[str(w)] = largest / (sum(sizes) / w)
    return shares


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "basis_memory.json"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--numel", type=int, default=D, help="D (smaller for a smoke test)")
    p.add_argument("--rows", type=int, default=K)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    workers = [int(w) for w in a.workers.split(",")]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        codes_path = Path(tmp) / "codes.npy"
        meta = write_basis(codes_path, a.numel, a.rows)
        block_sizes = [
            a.rows * (packed_size(y - x, BITS) + 8)
            for x, y in zip(meta["bounds"], meta["bounds"][1:])
        ]
        shards = min(SHARDS, len(block_sizes))
        meta["shard_bounds"] = balanced_bounds(block_sizes, shards)
        torch.save(
            {
                **meta,
                "scale": torch.as_tensor(meta["scale"]),
                "zero": torch.as_tensor(meta["zero"]),
            },
            Path(tmp) / "meta.pt",
        )  # plain tensors: read back with weights_only=True
        B_bytes = sum(block_sizes)
        common = {
            "device": a.device,
            "codes": str(codes_path),
            "meta": str(Path(tmp) / "meta.pt"),
            "steps": a.steps,
        }
        cases = []
        for w in workers:
            t0 = time.monotonic()
            both = run_world(w, common)
            ref = None
            for kind, ranks in both.items():
                errors = [r["error"] for r in ranks if "error" in r]
                if errors:
                    cases.append(
                        {
                            "placement": kind,
                            "workers": w,
                            "error": errors[0],
                            "traceback": next(r["traceback"] for r in ranks if "error" in r),
                        }
                    )
                    print(f"{kind} W={w}: FAILED {errors[0]}", flush=True)
                    continue
                alpha = ranks[0]["alpha"]
                assert all(torch.equal(r["alpha"], alpha) for r in ranks), "replicas differ"
                ref = alpha if kind == "replicate" else ref
                case = {
                    "placement": kind,
                    "workers": w,
                    "B_bytes": B_bytes,
                    "held_bytes_per_worker": max(r["held_bytes"] for r in ranks),
                    "rss_delta_bytes": max(r["rss_delta_bytes"] for r in ranks),
                    "wire_bytes_per_step": max(r["wire_bytes_per_step"] for r in ranks),
                    "step_ms": max(r["step_ms"] for r in ranks),
                    "alpha_max_rel_diff": None if ref is None else _max_rel(alpha, ref),
                    "held_over_B_per_W": max(r["held_bytes"] for r in ranks) / (B_bytes / w),
                }
                cases.append(case)
                diff = case["alpha_max_rel_diff"]
                print(
                    f"{kind:9s} W={w}: held {case['held_bytes_per_worker'] / 2**20:8.1f} MiB "
                    f"(rss +{case['rss_delta_bytes'] / 2**20:.0f} MiB), wire "
                    f"{case['wire_bytes_per_step'] / 2**20:6.1f} MiB/step, "
                    f"{case['step_ms']:8.1f} ms/step, alpha diff {diff}",
                    flush=True,
                )
            print(f"W={w}: {time.monotonic() - t0:.0f} s", flush=True)
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else cpu_model()
    result = {
        "cpu": cpu_model(),
        "device": device_name,
        "numel": a.numel,
        "rows": a.rows,
        "bits": BITS,
        "block_columns": BLOCK,
        "num_shards": shards,
        "steps": a.steps,
        "threads_per_worker": 1,
        "torch": torch.__version__,
        "cases": cases,
        "resnet18_layer_blocks_largest_share_over_B_per_W": layer_block_shares(workers),
        "total_seconds": time.monotonic() - t_start,
    }
    write_json(a.out, result)
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    mib = 2**20
    print(
        f"\n{result['device']}: D={result['numel']:,} K={result['rows']} bits={result['bits']}, "
        f"{result['num_shards']} shards of blocks of {result['block_columns']} columns"
    )
    header = [
        *("placement", "W", "B MiB", "held/worker MiB", "held / (B/W)", "wire MiB/step"),
        *("step ms", "alpha max rel diff"),
    ]
    rows = []
    for c in result["cases"]:
        if "error" in c:
            rows.append([c["placement"], c["workers"], f"failed: {c['error'][:80]}"])
            continue
        held, wire = c["held_bytes_per_worker"] / mib, c["wire_bytes_per_step"] / mib
        sizes = [f"{c['B_bytes'] / mib:.1f}", f"{held:.1f}", f"{c['held_over_B_per_W']:.3f}"]
        timing = [f"{wire:.1f}", f"{c['step_ms']:.1f}", c["alpha_max_rel_diff"]]
        rows.append([c["placement"], c["workers"], *sizes, *timing])
    print("\n".join(markdown_table(header, rows)))
    shares = result["resnet18_layer_blocks_largest_share_over_B_per_W"]
    print(
        "ResNet-18 layer-wise blocks, largest worker share / (B/W): "
        + ", ".join(f"W={w}: {s:.2f}" for w, s in shares.items())
    )


if __name__ == "__main__":
    sys.exit(main())

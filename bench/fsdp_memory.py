"""Per-rank memory of the coefficient phase, FSDP2-sharded vs data-parallel (results: bench/RESULTS.md, "Sharded models").

    python bench/fsdp_memory.py                 # 100.7M-parameter MLP, K=3, 4 bits, W = 1, 2, 4; writes bench/fsdp_memory.json
    python bench/fsdp_memory.py --smoke-test    # tiny shapes, seconds

Core level, no Ray: W gloo processes on this machine. The sharded path ``fully_shard``s the
model (built on the meta device, so no rank ever holds it whole), builds its columns of B from
its shards of K candidates (:func:`~twa_ray.core.sharded_subspace.build_affine_sharded`) and
takes a few :class:`~twa_ray.core.sharded_twa.ShardedTWA` steps. The data-parallel path holds
the whole model and B on every rank (:class:`~twa_ray.core.twa.TWA`, replicate placement): its
per-rank bytes do not depend on W, it runs at W = 1 (``--dp-worlds`` for more).

Per rank, tracked tensor bytes (unique storages held) during a coefficient step, after the
backward: parameters (FSDP2: the padded local shards), gradients, origin, packed B; the
candidate bytes held at once while building B (the stream yields one at a time); and the peak
RSS growth over the process's RSS before the model existed, sampled every 2 ms, in the build
and in the coefficient phase (the FSDP2 all-gather of one unit's parameters, the build's float64
temporaries and the allocator show up here, not in the tracked bytes).

The target: per-rank parameters + origin + B <= 1.2 x (the data-parallel path's) / W.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import cpu_model, free_port, markdown_table, write_json
from torch import nn
from torch.distributed.fsdp import fully_shard

from twa_ray.core.layout import Blocks, Layout, flatten
from twa_ray.core.placement import place
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import quantize
from twa_ray.core.sharded import LocalShards, local_flat
from twa_ray.core.sharded_subspace import build_affine_sharded
from twa_ray.core.sharded_twa import ShardedTWA
from twa_ray.core.subspace import build_affine
from twa_ray.core.twa import TWA, TWAConfig

MiB = 1 << 20
TARGET = 1.2


class RssPeaks:
    """The peak RSS per phase, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.phase = "start"
        self.peak: dict[str, int] = {}
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = self.rss()
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)

    def enter(self, phase: str) -> None:
        rss = self.rss()
        self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)
        self.phase = phase
        self.peak[phase] = rss

    def stop(self) -> dict[str, int]:
        self.enter("end")
        self._stop.set()
        self._thread.join()
        return self.peak


def storage_bytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes of the unique storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        s = local.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def make_model(layers: int, width: int, device: str = "cpu") -> nn.Module:
    with torch.device(device):
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def candidate_stream(theta0: torch.Tensor, num: int, seed: int):
    """K candidates ``theta0 + 0.01 noise``, generated again on every pass: one in memory."""

    def stream() -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(num):
            yield theta0 + 0.01 * torch.randn(theta0.shape, generator=gen)

    return stream


def warm_up(path: str, bits: int) -> None:
    """Lazy imports, kernels, thread pools and the autograd engine: before the baseline RSS."""
    pm = quantize(torch.randn(4, 4096), Blocks((0, 4096), ("w",)), bits)
    reconstruct(pm, torch.zeros(4, 1), None, out=torch.empty(4096))
    project(pm, torch.randn(4096))
    model = make_model(2, 16)
    if path == "fsdp":
        fully_shard(model)
    model(torch.randn(2, 16)).sum().backward()
    alpha = torch.zeros(2, 1, requires_grad=True)
    opt = torch.optim.SGD([alpha], lr=0.1, momentum=0.9)  # torch.optim's lazy imports
    alpha.grad = torch.ones(2, 1)
    opt.step()


def run_rank(rank: int, world: int, path: str, args: argparse.Namespace, peaks: RssPeaks) -> dict:
    """One rank's build and coefficient steps; returns its readings."""
    config = TWAConfig(bits=args.bits, blocks="tensor", lr=0.1, schedule="constant")
    peaks.enter("model")
    torch.manual_seed(0)
    if path == "fsdp":
        model = make_model(args.layers, args.width, "meta")
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")  # only the local shards are allocated
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().normal_(0, 0.02)
        shards = LocalShards.from_module(model)
        layout = shards.layout
        theta0 = local_flat(model)
    else:
        model = make_model(args.layers, args.width)
        layout = Layout.from_module(model)
        theta0 = flatten(model, layout)
    stream = candidate_stream(theta0, args.candidates, seed=1 + rank)
    candidate_bytes = theta0.nbytes  # one candidate of this rank's coordinates at a time
    peaks.enter("build")
    t0 = time.perf_counter()
    blocks = layout.blocks("tensor")
    if path == "fsdp":
        sub = build_affine_sharded(stream, shards, blocks=blocks, bits=args.bits)
    else:
        sub = build_affine(stream, layout, blocks=blocks, bits=args.bits)
    build_s = time.perf_counter() - t0
    del theta0
    peaks.enter("coefficients")
    if path == "fsdp":
        twa: TWA = ShardedTWA(model, sub, config=config)
    else:
        twa = TWA(model, place(sub, "replicate", rank=rank, world=world), config=config)
    del sub
    twa.start(args.steps)
    gen = torch.Generator().manual_seed(100 + rank)
    held: dict[str, int] = {}
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x = torch.randn(args.batch, args.width, generator=gen)
        y = torch.randint(0, args.width, (args.batch,), generator=gen)
        a, *_ = twa.coefficient_grad((x, y))
        params = list(model.parameters())
        basis = twa.placement.basis
        packed = [] if basis is None else getattr(basis, "shards", [basis])
        held = {
            "params": storage_bytes(params),
            "grads": storage_bytes([p.grad for p in params]),
            "origin": storage_bytes([twa.placement.origin]),
            "B": sum(pm.nbytes for pm in packed),
        }
        twa.apply_(a)
    step_s = (time.perf_counter() - t0) / args.steps
    return {
        **held,
        "candidate": candidate_bytes,
        "numel": layout.numel,
        "build_s": build_s,
        "step_s": step_s,
        "alpha_norm": float(twa.alpha.norm()),
    }


def _worker(
    rank: int, world: int, port: int, path: str, args: argparse.Namespace, out: str
) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        warm_up(path, args.bits)
        peaks = RssPeaks()
        base = peaks.rss()
        res = run_rank(rank, world, path, args, peaks)
        peak = peaks.stop()
        res.update(
            rss_base=base,
            rss_build=peak.get("build", base) - base,
            rss_coefficients=peak.get("coefficients", base) - base,
            maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def measure(path: str, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """Spawn ``world`` ranks of ``path``; the largest reading over ranks of every quantity."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(world, free_port(), path, args, out), nprocs=world, join=True)
        wall = time.perf_counter() - t0
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    worst = {k: max(r[k] for r in ranks) for k in ranks[0]}
    return {"path": path, "world": world, "wall_s": wall, **worst, "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny shapes (seconds)")
    parser.add_argument("--layers", type=int, default=24, help="Linear layers of the MLP")
    parser.add_argument("--width", type=int, default=2048, help="width of each layer")
    parser.add_argument("--candidates", type=int, default=3, help="K")
    parser.add_argument("--bits", type=int, default=4, help="bits per code of B")
    parser.add_argument("--steps", type=int, default=3, help="coefficient steps")
    parser.add_argument("--batch", type=int, default=4, help="examples per rank and step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="FSDP W")
    parser.add_argument("--dp-worlds", type=int, nargs="+", default=[1], help="data-parallel W")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.layers, args.width, args.steps, args.worlds = 3, 64, 2, [1, 2]
        args.out = os.devnull
    results = [measure("dp", w, args) for w in args.dp_worlds]
    results += [measure("fsdp", w, args) for w in args.worlds]
    dp = results[0]
    total = dp["params"] + dp["origin"] + dp["B"]  # the whole model + origin + B
    rows = []
    for r in results:
        held = r["params"] + r["origin"] + r["B"]
        r["held"] = held
        r["ratio"] = held / (total / r["world"])
        rows.append(
            [
                r["path"],
                r["world"],
                f"{r['params'] / MiB:.1f}",
                f"{r['grads'] / MiB:.1f}",
                f"{r['origin'] / MiB:.1f}",
                f"{r['B'] / MiB:.1f}",
                f"{r['candidate'] / MiB:.1f}",
                f"{held / MiB:.1f}",
                f"{r['ratio']:.3f}",
                f"{r['rss_build'] / MiB:.0f}",
                f"{r['rss_coefficients'] / MiB:.0f}",
                f"{r['step_s']:.2f}",
            ]
        )
    header = [
        "path",
        "W",
        "params",
        "grads",
        "origin",
        "B",
        "1 candidate",
        "params+origin+B",
        "/ (total/W)",
        "peak dRSS build",
        "peak dRSS coeff",
        "s/step",
    ]
    print(
        f"MLP {args.layers} x Linear({args.width}, {args.width}): D = {dp['numel']:,}, "
        f"K = {args.candidates}, {args.bits} bits, blocks='tensor'; MiB per rank (largest rank); "
        f"CPU: {cpu_model()}"
    )
    print("\n".join(markdown_table(header, rows)))
    fsdp = [r for r in results if r["path"] == "fsdp"]
    ok = all(r["ratio"] <= TARGET for r in fsdp)
    print(
        f"target per-rank params + origin + B <= {TARGET} x total / W: {'met' if ok else 'MISSED'}"
    )
    write_json(
        args.out,
        {"cpu": cpu_model(), "args": vars(args), "target": TARGET, "met": ok, "results": results},
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

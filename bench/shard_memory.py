"""Memory of the packed basis B per node with 1, 2 and 4 workers (results: bench/RESULTS.md, "Projection shards").

    python bench/shard_memory.py                 # 1M parameters, K=32, 4 bits; writes bench/shard_memory.json
    python bench/shard_memory.py --smoke-test    # tiny shapes, seconds

The claim: the object store holds one copy of packed B whatever the number of workers, and a
worker that materializes the subspace (``ShardedSubspace.materialize``: zero-copy views) and runs
``project`` + ``reconstruct`` over all of B (every page touched) does not grow its unique memory
by the size of B.

Per worker (a Ray actor), from ``/proc/self/smaps_rollup`` before materialize and after the
products (buffers for g and theta allocated before the first reading):

- RSS grows by ~B: the mapped object-store pages are resident in the process;
- USS (private pages) stays flat: those pages are shared, not copied;
- PSS (a shared page split among its mappers, the driver included), read once every worker
  holds its mapping: the workers' PSS deltas sum to at most one copy of B (and origin) per node.

Object store usage comes from the raylet (``object_store_bytes_used``). A control worker copies
B (``clone`` of every shard) to show that the same readings do see a private copy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch

MiB = 1 << 20


def read_memory() -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) of this process in bytes, from smaps_rollup."""
    fields: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0), "uss": uss}


def object_store_used() -> tuple[int, int]:
    """(bytes, objects) in this node's object store, as the raylet counts them."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used), int(reply.store_stats.num_local_objects)


@ray.remote(num_cpus=0.5)
class Reader:
    """A worker that maps the subspace and reads all of B once, reporting its memory."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        # warm up: imports, the compiled kernel, the allocator (not part of the B deltas)
        from twa_ray.core.layout import Blocks
        from twa_ray.core.project import project, reconstruct
        from twa_ray.core.quant import quantize

        pm = quantize(torch.randn(4, 4096), Blocks((0, 4096), ("w",)), 4)
        reconstruct(pm, torch.zeros(4, 1), None, out=torch.empty(4096))
        project(pm, torch.randn(4096))

    def run(self, sharded: Any, copy: bool = False) -> dict[str, Any]:
        numel = sharded.numel
        # g and theta allocated and touched before the first reading: not part of the deltas
        g, theta = torch.randn(numel), torch.empty(numel).fill_(0.0)
        alpha = torch.full(sharded.coeff_shape, 0.01)
        self._before = read_memory()
        t0 = time.perf_counter()
        view = sharded.materialize()
        if copy:  # control: a private copy of every shard
            from dataclasses import replace

            basis = view.basis
            basis.shards = tuple(
                replace(pm, data=pm.data.clone(), scale=pm.scale.clone(), zero=pm.zero.clone())
                for pm in basis.shards
            )
        a = view.project(g)  # reads every byte of B
        view.reconstruct(alpha, out=theta)  # and again
        elapsed = time.perf_counter() - t0
        self._keep = (view, g, theta)  # hold the mapping until the settled reading
        return {
            "pid": os.getpid(),
            "seconds": elapsed,
            "checksum": float(a.sum()) + float(theta[:: max(1, numel // 1000)].sum()),
            **self.reading(),
        }

    def reading(self) -> dict[str, Any]:
        """Memory now and its growth since just before materialize."""
        now = read_memory()
        return {
            "before": self._before,
            "after": now,
            "delta": {k: now[k] - self._before[k] for k in now},
        }


def make_sharded(numel: int, num_blocks: int, num_candidates: int, bits: int, seed: int = 0):
    """Random candidates of a ``numel``-parameter layout, the affine subspace in the store."""
    from twa_ray.core.layout import Layout
    from twa_ray.core.twa import TWAConfig
    from twa_ray.ray.shards import put_subspace

    size = numel // num_blocks
    layout = Layout.from_tensors({f"layer{i}.weight": torch.empty(size) for i in range(num_blocks)})

    def stream():  # re-iterable, one candidate in memory at a time: a drifting SGD-like walk
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(layout.numel, generator=gen)
        for _ in range(num_candidates):
            yield base + 0.1 * torch.randn(layout.numel, generator=gen)

    config = TWAConfig(bits=bits, blocks="tensor")
    return put_subspace(stream, layout, config, num_shards=min(2, num_blocks))


def measure(sharded: Any, num_workers: int, *, copy: bool = False) -> dict[str, Any]:
    used0, _ = object_store_used()
    readers = [Reader.remote() for _ in range(num_workers)]  # type: ignore[attr-defined]
    ray.get([r.__ray_ready__.remote() for r in readers])
    rows = ray.get([r.run.remote(sharded, copy) for r in readers])
    # PSS splits a shared page among its mappers: read it once every reader holds its mapping
    settled = ray.get([r.reading.remote() for r in readers])
    used1, objects = object_store_used()
    for r in readers:
        ray.kill(r)
    deltas = [row["delta"] for row in rows]
    return {
        "workers": num_workers,
        "copy": copy,
        "object_store_bytes": used1,
        "object_store_objects": objects,
        "object_store_growth_bytes": used1 - used0,
        "per_worker": rows,
        "max_delta_rss": max(d["rss"] for d in deltas),
        "max_delta_uss": max(d["uss"] for d in deltas),
        "settled": settled,
        "sum_delta_pss": sum(row["delta"]["pss"] for row in settled),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny shapes (seconds)")
    parser.add_argument("--numel", type=int, default=1_000_000, help="parameters D")
    parser.add_argument("--candidates", type=int, default=32, help="K")
    parser.add_argument("--bits", type=int, default=4, help="bits per code of B")
    parser.add_argument("--blocks", type=int, default=4, help="parameter tensors (blocks) in D")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts")
    parser.add_argument(
        "--out", default=str(Path(__file__).with_suffix(".json")), help="JSON output"
    )
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.numel, args.candidates, args.workers = 40_000, 8, [1, 2]
        args.out = os.devnull

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # readers take 0.5 CPU each: 4 of them fit on 2 cores
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=512 * MiB, log_to_driver=False
    )
    try:
        t0 = time.perf_counter()
        sharded = make_sharded(args.numel, args.blocks, args.candidates, args.bits)
        build_s = time.perf_counter() - t0
        results = [measure(sharded, n) for n in args.workers]
        control = measure(sharded, 1, copy=True)
    except BaseException:
        ray.shutdown()
        raise
    b = sharded.nbytes
    origin = sharded.numel * 4
    print(
        f"packed B: D={sharded.numel:,} K={sharded.num_rows} bits={sharded.bits} "
        f"L={sharded.num_blocks} shards={sharded.num_shards}: {b / MiB:.2f} MiB "
        f"(+ origin {origin / MiB:.2f} MiB); built and put in {build_s:.1f} s"
    )
    header = (
        f"{'workers':>8} {'store MiB':>10} {'objects':>8} {'max dRSS':>9} {'max dUSS':>9} "
        f"{'sum dPSS':>9}  (MiB; B = {b / MiB:.2f})"
    )
    print(header)
    for r in [*results, control]:
        name = f"{r['workers']}{' copy' if r['copy'] else ''}"
        print(
            f"{name:>8} {r['object_store_bytes'] / MiB:>10.2f} {r['object_store_objects']:>8} "
            f"{r['max_delta_rss'] / MiB:>9.2f} {r['max_delta_uss'] / MiB:>9.2f} "
            f"{r['sum_delta_pss'] / MiB:>9.2f}"
        )
    flat_store = len({r["object_store_bytes"] for r in results}) == 1
    uss_flat = all(r["max_delta_uss"] < 0.25 * b for r in results)
    print(
        f"object store flat across worker counts: {flat_store}; per-worker USS growth < B/4: "
        f"{uss_flat}; control copy USS growth / B = {control['max_delta_uss'] / b:.2f}"
    )
    report = {
        "numel": sharded.numel,
        "num_candidates": sharded.num_rows,
        "bits": sharded.bits,
        "num_blocks": sharded.num_blocks,
        "num_shards": sharded.num_shards,
        "packed_bytes": b,
        "origin_bytes": origin,
        "build_seconds": build_s,
        "results": results,
        "control_copy": control,
        "object_store_flat": flat_store,
        "uss_flat": uss_flat,
    }
    ray.shutdown()
    if args.out != os.devnull:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0 if args.smoke_test or (flat_store and uss_flat) else 1


if __name__ == "__main__":
    sys.exit(main())

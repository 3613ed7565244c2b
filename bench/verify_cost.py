"""What checking the stored CRC-32 on every candidate read costs (``CandidateStore.read``).

Two measurements, side by side in one process:

1. ``twa-ray average`` on MNIST-1D (MLP, K candidates): the time spent in ``zlib.crc32`` during
   the whole command, as a share of its wall time (every read is verified: baselines, the
   overflow check, the subspace build).
2. Reading K candidates of D float32 and summing each (a consumer that touches every page, as
   the subspace build does): ``verify=True`` against ``verify=False``, for several D.

Prints a table with the CPU model and writes ``bench/verify_cost.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import torch
from _common import ROOT, cpu_model, markdown_table, write_json

from twa_ray.core.layout import Layout, flatten
from twa_ray.store import CandidateStore
from twa_ray.store import store as store_module


def _average_share(tmp: Path, k: int, num_samples: int) -> dict[str, float]:
    """Wall time of one ``average`` and the time its CRC checks took."""
    from twa_ray.cli import main
    from twa_ray.data import load_dataset
    from twa_ray.models import build_model

    splits = load_dataset("mnist1d", num_samples=num_samples, seed=0)
    store = CandidateStore(tmp / "store", create=True)
    for i in range(k):
        torch.manual_seed(i)
        model = build_model("mlp", num_classes=splits.num_classes, input_shape=splits.input_shape)
        layout = Layout.from_module(model)
        store.write(flatten(model, layout), layout, step=i)
    spent = [0.0, 0]
    crc32 = zlib.crc32

    def timed(data, value=0):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return crc32(data, value)
        finally:
            spent[0] += time.perf_counter() - t
            spent[1] += 1

    store_module.zlib.crc32 = timed  # type: ignore[attr-defined]
    try:
        t = time.perf_counter()
        rc = main(
            [
                "average",
                "-q",
                "--store",
                str(tmp / "store"),
                "--out",
                str(tmp / "avg"),
                "--num-samples",
                str(num_samples),
                "--twa-epochs",
                "3",
                "--mode",
                "both",
            ]
        )
        wall = time.perf_counter() - t
    finally:
        store_module.zlib.crc32 = crc32  # type: ignore[attr-defined]
    assert rc == 0
    return {
        "k": k,
        "numel": layout.numel,
        "wall_s": wall,
        "crc_s": spent[0],
        "crc_calls": spent[1],
        "share": spent[0] / wall,
    }


def _read_pair(tmp: Path, numel: int, k: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds to read and sum ``k`` candidates, with and without the check."""
    layout = Layout(("w",), ((numel,),), ("float32",))
    store = CandidateStore(tmp / f"s{numel}", create=True)
    for i in range(k):
        store.write(torch.randn(numel, generator=torch.Generator().manual_seed(i)), layout, step=i)
    names = store.names()
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for verify in (False, True):  # interleaved: machine noise hits both alike
            t = time.perf_counter()
            for n in names:
                float(store.read(n, verify=verify).sum())
            best[verify] = min(best[verify], time.perf_counter() - t)
    gbps = k * numel * 4 / best[True] / 1e9
    return {
        "numel": numel,
        "k": k,
        "read_s": best[False],
        "read_verified_s": best[True],
        "overhead": best[True] / best[False] - 1,
        "verified_GBps": gbps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "verify_cost.json"))
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        avg = _average_share(tmp, args.k, args.num_samples)
        reads = [_read_pair(tmp, int(s), args.k, args.repeats) for s in args.sizes.split(",")]
    cpu = cpu_model()
    print(f"CPU: {cpu}")
    print(
        f"twa-ray average, MNIST-1D MLP, K={avg['k']}, D={avg['numel']:,}: wall {avg['wall_s']:.2f} s, "
        f"CRC-32 checks {avg['crc_s'] * 1e3:.1f} ms in {avg['crc_calls']} reads = {100 * avg['share']:.2f}% of the command"
    )
    header = ["D", "K", "read+sum (s)", "read+verify+sum (s)", "overhead", "verified GB/s"]
    rows = [
        [f"{r['numel']:,}", r["k"], f"{r['read_s']:.4f}", f"{r['read_verified_s']:.4f}"]
        + [f"{100 * r['overhead']:.0f}%", f"{r['verified_GBps']:.2f}"]
        for r in reads
    ]
    print("\n".join(markdown_table(header, rows)))
    write_json(args.out, {"cpu": cpu, "average": avg, "reads": reads})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

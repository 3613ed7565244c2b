"""A streamed epoch's fixed cost with Ray's idle-worker default against twa-ray's local Ray
(results: bench/RESULTS.md, "Streamed epochs").

    python bench/stream_epochs.py                 # writes bench/stream_epochs.json
    python bench/stream_epochs.py --smoke-test    # 2 epochs, no JSON

``--ingest stream`` reads each rank's training rows through Ray Data every epoch
(:func:`twa_ray.data.stream.train_datasets`: MNIST-1D as 3 parquet files, 1,000 rows, 2 ranks).
Between two epochs the training takes a while (``--gap`` seconds, here a sleep); Ray kills an
idle task worker above its soft limit after ``idle_worker_killing_time_threshold_ms`` (1 s by
default), so every epoch's read tasks start fresh worker processes. The same epochs on two
local Rays started one after the other in this process: Ray's default, then the setting a local
Ray of ``twa-ray`` gets (:func:`twa_ray.connect.local_ray_defaults`). Per setting: the first
epoch (processes started either way) and the mean of the later ones, with the worker processes
each later epoch started.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, cpu_model, report

HERE = Path(__file__).resolve().parent
ENV = "RAY_idle_worker_killing_time_threshold_ms"


def _ray_pids() -> set[int]:
    """This machine's Ray worker processes (Linux: their command lines under /proc)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:  # the process ended meanwhile
            continue
        if b"default_worker" in cmdline or cmdline.startswith(b"ray::"):
            pids.add(int(entry.name))
    return pids


def epochs(train: Any, idle_ms: int, n: int, gap: float) -> dict[str, Any]:
    """``n`` epochs of both ranks' streamed rows on a fresh local Ray with ``idle_ms``."""
    import ray

    from twa_ray.data.stream import train_datasets

    os.environ[ENV] = str(idle_ms)  # the raylet reads it when it starts
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        seconds, started, rows = [], [], 0
        for _ in range(n):
            before = _ray_pids()
            t0 = time.perf_counter()
            rows = 0
            for ds in train_datasets(train, 2).values():
                for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
                    rows += len(batch["y"])
            seconds.append(time.perf_counter() - t0)
            started.append(len(_ray_pids() - before))
            time.sleep(gap)  # the epoch's training
    finally:
        ray.shutdown()
        os.environ.pop(ENV, None)
    later = seconds[1:] or seconds
    return {
        "idle_worker_ms": idle_ms,
        "rows_per_epoch": rows,
        "epoch_s": seconds,
        "first_epoch_s": seconds[0],
        "later_epoch_s": sum(later) / len(later),
        "processes_started_per_later_epoch": started[1:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--gap", type=float, default=2.0, help="seconds of training between epochs")
    p.add_argument("--smoke-test", action="store_true", help="2 epochs, no JSON")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.epochs = 2
    sys.path.insert(0, str(ROOT / "tests"))
    from data_files import write_parquet

    from twa_ray.config import DataConfig
    from twa_ray.connect import IDLE_WORKER_MS
    from twa_ray.data import load_dataset
    from twa_ray.data.stream import stream_splits

    with tempfile.TemporaryDirectory() as tmp:
        root = f"{tmp}/pq"
        write_parquet(root, 1000, files=3)
        splits = load_dataset("parquet", root=root)
        train = stream_splits(splits, DataConfig(dataset="parquet", data_root=root)).train
        runs = {
            "ray_default": epochs(train, 1000, args.epochs, args.gap),
            "twa_ray_local": epochs(train, IDLE_WORKER_MS, args.epochs, args.gap),
        }
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "gap_s": args.gap, **runs}
    rows = [
        (
            name,
            r["idle_worker_ms"],
            f"{r['first_epoch_s']:.2f}",
            f"{r['later_epoch_s']:.2f}",
            r["processes_started_per_later_epoch"],
        )
        for name, r in runs.items()
    ]
    header = ("setting", "idle worker ms", "epoch 1 s", "later epochs s", "new processes")
    title = f"{result['cpu']}, {result['cores']} cores; {args.gap:g} s between epochs"
    report(title, header, rows, result, None if args.smoke_test else HERE / "stream_epochs.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

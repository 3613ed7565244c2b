"""Data input: MNIST-1D in memory (generated, cached) vs the same rows as parquet on local disk
and in an S3 server (moto's, on 127.0.0.1), read by ``--dataset parquet --data-root URI``.

    python bench/data_input.py                  # three smoke runs, ~5-10 min on 2 loaded cores
    python bench/data_input.py --run-args "--epochs 40"   # any twa-ray run flags instead

Per source: the seconds to read the three splits (``load_dataset``, as the driver and each
worker do), the train split's samples per second through a ``DataLoader`` (batch 128, after
a warm-up pass), and a
``twa-ray run``: its wall-clock, its sampling phase's seconds and samples per second (training
rows x sampled epochs / sampling seconds). Writes bench/data_input.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, cpu_model, markdown_table, twa_ray_cli, write_json

sys.path[:0] = [str(ROOT / "tests")]

from data_files import write_parquet  # noqa: E402
from s3_faults import moto_s3  # noqa: E402

from twa_ray.data import load_dataset  # noqa: E402
from twa_ray.data.loaders import make_loader  # noqa: E402

NUM_SAMPLES = 12_500  # MNIST-1D's default size: 10k train + val, 2.5k test


def _read(args: list[str]) -> tuple[float, float, dict]:
    """(seconds to read the splits, train samples/s through a DataLoader, split summary)."""
    dataset, root = args[1], args[3] if len(args) > 3 else None
    extra = {"num_samples": NUM_SAMPLES} if dataset == "mnist1d" else {}
    t0 = time.perf_counter()
    splits = load_dataset(dataset, root=root, **extra)
    read_s = time.perf_counter() - t0
    loader = make_loader(splits.train, 128, shuffle=True)
    for _ in loader:  # warm-up pass
        pass
    t0, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return read_s, n / (time.perf_counter() - t0), splits.summary()


def _run(args: list[str], out: Path, run_args: list[str]) -> dict:
    """A ``twa-ray run`` in a subprocess: its metrics. ``--num-samples`` keeps every row (MNIST-1D:
    the rows generated; parquet: a cap on the training rows above their number)."""
    extra = ["--num-samples", str(NUM_SAMPLES)]
    argv = twa_ray_cli("run", *args, *run_args, *extra, "--out", str(out))
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-args", default="--smoke-test", help="flags of each twa-ray run")
    p.add_argument("--json", default=str(ROOT / "bench" / "data_input.json"))
    a = p.parse_args()
    run_args = shlex.split(a.run_args)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp, moto_s3() as endpoint:
        s3 = f"s3://bkt/mnist1d?endpoint_override={endpoint}&scheme=http"
        for uri in (f"{tmp}/parquet", s3):
            write_parquet(uri, NUM_SAMPLES, files=4)
        sources = {
            "in memory (mnist1d)": ["--dataset", "mnist1d"],
            "parquet, local disk": ["--dataset", "parquet", "--data-root", f"{tmp}/parquet"],
            "parquet, S3 (moto)": ["--dataset", "parquet", "--data-root", s3],
        }
        for i, (name, args) in enumerate(sources.items()):
            read_s, loader_sps, summary = _read(args)
            with contextlib.chdir(tmp):
                m = _run(args, Path(tmp) / f"run{i}", run_args)
            sampled = len(m["sampling_history"])
            sps = m["data"]["train"] * sampled / m["wall_s"]["sampling"]
            results[name] = {
                "read_s": round(read_s, 3),
                "loader_samples_per_s": round(loader_sps),
                "run_wall_s": m["wall_time_s"],
                "sampling_s": m["wall_s"]["sampling"],
                "sampling_samples_per_s": round(sps),
                "data": m["data"],
                "twa_v_test_acc": m["methods"]["twa_v"]["test_acc"],
            }
            r = results[name]
            rows.append(
                [name, r["read_s"], r["loader_samples_per_s"], r["run_wall_s"], r["sampling_s"]]
                + [r["sampling_samples_per_s"], m["data"]["train"], m["data"]["val_digest"]]
            )
    header = ["source", "read s", "loader samples/s", "run wall s", "sampling s"]
    header += ["sampling samples/s", "train rows", "val_digest"]
    print("\n".join(markdown_table(header, rows)))
    print(f"CPU: {cpu_model()}; run flags: {a.run_args}")
    write_json(a.json, {"cpu": cpu_model(), "run_args": a.run_args, "results": results})


if __name__ == "__main__":
    main()

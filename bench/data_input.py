"""Data input: MNIST-1D in memory (generated, cached) vs the same rows as parquet on local disk
and in an S3 server (moto's, on 127.0.0.1), read by ``--dataset parquet --data-root URI``, each
loaded into the workers' memory (``--ingest memory``) or streamed by Ray Data (``--ingest
stream``, the default).

    python bench/data_input.py                  # five default jobs, ~30-60 min on 2 loaded cores
    python bench/data_input.py --run-args "--smoke-test"   # any twa-ray run flags instead

Per source: the seconds to read the three splits (``load_dataset``, as the driver does), the
train split's samples per second as one worker reads it (batch 128, the best of passes 2-3:
in memory a ``DataLoader``, streamed Ray Data's iterator on a local Ray of 2 CPUs), and a
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

from twa_ray.config import DataConfig  # noqa: E402
from twa_ray.data import load_data  # noqa: E402
from twa_ray.data.loaders import make_loader  # noqa: E402

NUM_SAMPLES = 12_500  # MNIST-1D's default size: 10k train + val, 2.5k test


def _read(args: list[str]) -> tuple[float, float, dict]:
    """(seconds to read the splits, train samples/s as one worker reads them, split summary)."""
    d = dict(zip(args[::2], args[1::2]))
    data = DataConfig(
        dataset=d["--dataset"],
        data_root=d.get("--data-root"),
        ingest=d.get("--ingest", "auto"),  # type: ignore[arg-type]
        num_samples=NUM_SAMPLES if d["--dataset"] == "mnist1d" else None,
    )
    t0 = time.perf_counter()
    splits = load_data(data)
    read_s = time.perf_counter() - t0
    loader = _stream_loader(splits, data) if "--ingest" in d and data.ingest == "stream" else None
    loader = loader or make_loader(splits.train, 128, shuffle=True)
    rates = []
    for epoch in range(3):  # the first pass warms up; the best of the other two
        t0, n = time.perf_counter(), 0
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for x, _ in loader:
            n += len(x)
        rates.append(n / (time.perf_counter() - t0))
    return read_s, max(rates[1:]), splits.summary()


def _stream_loader(splits, data: DataConfig):
    """One worker's (rank 0 of 1) streamed batches of 128, read by Ray Data on the local Ray."""
    from twa_ray.data.stream import StreamLoader, ingest_options, stream_splits, train_datasets

    train = stream_splits(splits, data).train
    ds = train_datasets(train, 1)["train_0"]
    ds.context.execution_options = ingest_options()
    return StreamLoader(train, ds.iterator(), 0, 1, 128, data.seed)


def _run(args: list[str], out: Path, run_args: list[str]) -> dict:
    """A ``twa-ray run`` in a subprocess: its metrics. ``--num-samples`` keeps every row (MNIST-1D:
    the rows generated; parquet: a cap on the training rows above their number)."""
    extra = ["--num-samples", str(NUM_SAMPLES)]
    argv = twa_ray_cli("run", *args, *run_args, *extra, "--out", str(out))
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def _start_ray(tries: int = 3) -> None:
    """A local Ray of 2 CPUs; on a loaded machine its start may time out: tried again."""
    import ray

    for i in range(tries):
        try:
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 << 20)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or i + 1 == tries:
                raise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-args", default="", help="flags of each twa-ray run (default: none)")
    p.add_argument("--json", default=str(ROOT / "bench" / "data_input.json"))
    a = p.parse_args()
    run_args = shlex.split(a.run_args)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp, moto_s3() as endpoint:
        s3 = f"s3://bkt/mnist1d?endpoint_override={endpoint}&scheme=http"
        for uri in (f"{tmp}/parquet", s3):
            write_parquet(uri, NUM_SAMPLES, files=4)
        sources = {"in memory (mnist1d)": ["--dataset", "mnist1d"]}
        for where, root in (("local disk", f"{tmp}/parquet"), ("S3 (moto)", s3)):
            for ingest in ("memory", "stream"):
                args = ["--dataset", "parquet", "--data-root", root, "--ingest", ingest]
                sources[f"parquet, {where}, {ingest}"] = args
        _start_ray()  # the streamed reads' Ray
        reads = {name: _read(args) for name, args in sources.items()}
        import ray

        ray.shutdown()
        for i, (name, args) in enumerate(sources.items()):
            read_s, input_sps, _ = reads[name]
            with contextlib.chdir(tmp):
                m = _run(args, Path(tmp) / f"run{i}", run_args)
            sampled = len(m["sampling_history"])
            sampling_s = round(sum(m["wall_s"]["sampling"].values()), 2)  # rank 0's parts
            sps = m["data"]["train"] * sampled / sampling_s
            results[name] = {
                "read_s": round(read_s, 3),
                "input_samples_per_s": round(input_sps),
                "run_wall_s": m["wall_time_s"],
                "sampling_s": sampling_s,
                "sampling_samples_per_s": round(sps),
                "data": m["data"],
                "twa_v_test_acc": m["methods"]["twa_v"]["test_acc"],
            }
            r = results[name]
            rows.append(
                [name, r["read_s"], r["input_samples_per_s"], r["run_wall_s"], r["sampling_s"]]
                + [r["sampling_samples_per_s"], m["data"]["train"], m["data"]["val_digest"]]
            )
    header = ["source, ingest", "read s", "input samples/s", "run wall s", "sampling s"]
    header += ["sampling samples/s", "train rows", "val_digest"]
    print("\n".join(markdown_table(header, rows)))
    print(f"CPU: {cpu_model()}; run flags: {a.run_args or '(none: the default job)'}")
    write_json(a.json, {"cpu": cpu_model(), "run_args": a.run_args, "results": results})


if __name__ == "__main__":
    main()

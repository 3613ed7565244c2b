"""A Ray Train fit's fixed cost: Ray's ``TorchTrainer`` against twa-ray's
(:func:`twa_ray.ray.ray_internals.torch_trainer`: no ``DatasetManager`` without datasets, no
``PlacementGroupCleaner`` on a Ray this process started, a controller that does not import
torch). Results: bench/RESULTS.md, "Fit overhead".

    python bench/fit_overhead.py                 # 4 pairs, writes bench/fit_overhead.json
    python bench/fit_overhead.py --smoke-test    # 1 pair, no JSON

One local Ray (2 CPUs, started here, one warm-up fit first), then pairs of fits of 2 workers
whose loop reports once and returns, the two trainers alternating which goes first. Per fit:
``wall_s`` (``fit()`` to its return) and ``cpu_s`` (every process's CPU seconds meanwhile, from
``/proc/stat``: the machine should be otherwise idle).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, report

HERE = Path(__file__).resolve().parent


def busy_cpu_s() -> float:
    """CPU seconds spent by the whole machine so far (all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = list(map(int, f.readline().split()[1:]))
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def loop() -> None:
    import ray.train

    ray.train.report({"done": 1})


def fit(trainer_cls: type, storage: str, name: str) -> dict[str, float]:
    import ray.train

    trainer = trainer_cls(
        loop,
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=storage, name=name),
    )
    cpu0, t0 = busy_cpu_s(), time.perf_counter()
    trainer.fit()
    return {"wall_s": time.perf_counter() - t0, "cpu_s": busy_cpu_s() - cpu0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--smoke-test", action="store_true", help="1 pair, no JSON")
    args = p.parse_args(argv)
    pairs = 1 if args.smoke_test else args.pairs

    from twa_ray.connect import local_ray_defaults

    local_ray_defaults()  # as `twa-ray run` starts its Ray
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as fit_group sets it
    import ray
    from ray.train.torch import TorchTrainer

    from twa_ray.ray.ray_internals import torch_trainer

    trainers = {"ray_torch_trainer": TorchTrainer, "twa_ray_torch_trainer": None}
    fits: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
    with tempfile.TemporaryDirectory() as storage:
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            trainers["twa_ray_torch_trainer"] = torch_trainer(datasets=False)
            fit(TorchTrainer, storage, "warm-up")
            for i in range(pairs):
                order = list(trainers) if i % 2 == 0 else list(reversed(trainers))
                for name in order:
                    time.sleep(2)  # the previous fit's processes gone
                    fits[name].append(fit(trainers[name], storage, f"{name}-{i}"))
        finally:
            ray.shutdown()
    summary: dict[str, Any] = {
        name: {
            "fits": runs,
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
        }
        for name, runs in fits.items()
    }
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "pairs": pairs, **summary}
    header = ("trainer", "fits", "median wall s", "median CPU s", "walls s")
    rows = [
        (
            name,
            len(s["fits"]),
            f"{s['median_wall_s']:.2f}",
            f"{s['median_cpu_s']:.2f}",
            " ".join(f"{r['wall_s']:.2f}" for r in s["fits"]),
        )
        for name, s in summary.items()
    ]
    title = f"{result['cpu']}, {result['cores']} cores; 2 workers, a loop that reports once"
    report(title, header, rows, result, None if args.smoke_test else HERE / "fit_overhead.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

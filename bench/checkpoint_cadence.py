"""Wall time of `twa-ray run` with a Ray Train checkpoint at every chance (``--checkpoint-interval
0``: every sampling epoch and every coefficient pass, the behaviour before the interval existed)
vs the default (at most one per 10 s, plus each phase's end), side by side on a local Ray.

    python bench/checkpoint_cadence.py        # ~11 min on 2 cores

Ray Train 2.60 takes each worker's reports from a one-slot queue once per health check (2 s):
a report within 2 s of the previous one blocks the training loop. The MNIST-1D runs here have
epochs of ~0.2 s and a one-step TWA-v pass, so the cadence, not the compute, sets their speed.
Per run: wall time of the command, the checkpoints Ray Train registered (its snapshot's
report index), test accuracy of TWA-v (the cadence must not change results). Writes
bench/checkpoint_cadence.json and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, cpu_model, markdown_table, twa_ray_cli, write_json

CASES = {
    # the cluster tests' smoke run: 1500 samples, 20 of 40 epochs, 1 TWA epoch, 2 workers
    "smoke": ["--smoke-test", "--epochs", "40", "--workers", "2"],
    # the README's main command: every default (MNIST-1D, 2 workers, 3 TWA epochs)
    "readme": [],
}
CADENCES = {"every chance (0)": ["--checkpoint-interval", "0"], "default (10 s)": []}


def _reports(out: Path) -> dict[str, int]:
    """Reports Ray Train took per phase (its checkpoint manager's snapshot)."""
    found = {}
    for snap in glob.glob(
        str(out / "work" / "ray_train" / "*" / "checkpoint_manager_snapshot.json")
    ):
        phase = Path(snap).parent.name.split("_")[0]
        found[phase] = json.loads(Path(snap).read_text())["current_report_index"]
    return found


def run_once(case: str, cadence: str, tmp: Path, i: int) -> dict:
    out = tmp / f"{case}-{i}"
    cmd = twa_ray_cli("run", *CASES[case], *CADENCES[cadence], "--out", str(out))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "case": case,
        "cadence": cadence,
        "wall_s": round(wall, 1),
        "reports": _reports(out),
        "twa_v_test_acc": metrics["methods"]["twa_v"]["test_acc"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "checkpoint_cadence.json"))
    p.add_argument("--repeats", type=int, default=2, help="pairs of smoke runs (order alternates)")
    args = p.parse_args()
    names = list(CADENCES)
    order = [
        ("smoke", n) for i in range(args.repeats) for n in (names if i % 2 == 0 else names[::-1])
    ]
    order += [("readme", n) for n in names]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (case, cadence) in enumerate(order):
            rows.append(run_once(case, cadence, Path(tmp), i))
            r = rows[-1]
            print(
                f"{case:6s} {cadence:17s} {r['wall_s']:7.1f} s  reports {r['reports']}", flush=True
            )
    summary = {}
    for case in CASES:
        walls = {
            c: [r["wall_s"] for r in rows if r["case"] == case and r["cadence"] == c] for c in names
        }
        accs = {r["twa_v_test_acc"] for r in rows if r["case"] == case}
        best = {c: min(w) for c, w in walls.items()}
        summary[case] = {
            "wall_s": walls,
            "speedup": round(best[names[0]] / best[names[1]], 2),
            "same_twa_v_test_acc": len(accs) == 1,
        }
    result = {"cpu": cpu_model(), "runs": rows, "summary": summary}
    write_json(args.out, result)
    print(f"CPU: {result['cpu']}")
    header = ["run", *(f"{n} s" for n in names), "speed-up (best of each)", "same TWA-v test acc"]
    walls = {
        case: [", ".join(map(str, s["wall_s"][n])) for n in names] for case, s in summary.items()
    }
    rows = [
        [case, *walls[case], f"{s['speedup']}x", s["same_twa_v_test_acc"]]
        for case, s in summary.items()
    ]
    print("\n".join(markdown_table(header, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

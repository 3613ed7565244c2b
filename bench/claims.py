"""The promise, measured the way a user meets it: ``twa-ray run --compare-full`` on held-out seeds.

Each seed is one run of the product's own command (a local Ray, 2 workers), which trains, in one
process and on the same cluster, the TWA path (sampling for f*E epochs, B, TWA-t and TWA-v) and
every baseline a user could pick instead: SGD at the stop, SWA, greedy soup, the EMA of the
sampling run, SGD on the same schedule compressed to TWA's epochs (``sgd_short``) and SGD over the
full budget (``sgd_full``). Accuracy and wall seconds come from each run's ``metrics.json``
(``methods.<name>.wall_s``: what a run producing only that model takes here, Ray start included).

Per method: test accuracy mean ± std over the seeds, the paired difference to ``sgd_full`` with a
95 % t-interval, and the wall-clock ratio to ``sgd_full``. Two rows are chosen per seed before
the test split is seen: ``saved`` (the method ``model.safetensors`` holds: the best on the hold
part of val among TWA-t, TWA-v, EMA, SWA and the last iterate) and ``twa_chosen`` (the TWA
variant of higher hold accuracy). The checks of issues 19 and 29: the saved model >= EMA, SWA,
the last iterate and sgd_short (paired differences, 95 % t-intervals); the chosen TWA variant
within 0.2 points of full training at <= 60 % of its epochs; the wall-clock ratios.

Workloads (``--workload``, one or more): ``cnn`` (the main job, ``configs/mnist1d_cnn.yaml``:
the defaults), ``mlp`` (``configs/mnist1d_mlp.yaml``) or a config file's path.

    python bench/claims.py --workload cnn mlp    # seeds 200-204 (never used for tuning)
    python bench/claims.py --workload mlp --seeds 200 --out bench/claims_large -- --num-samples 60000

The Ray tax (issue 28): per seed the same sampling run as plain PyTorch DDP (gloo, the same
workers, no Ray: :func:`ray_tax.plain_ddp`) is timed too, and ``sgd_sampled``'s wall seconds (a
Ray Train run producing only that model) are divided by it (``--no-ddp`` skips it).

Flags after ``--`` go to ``twa-ray run``. Writes ``OUT.json``, ``OUT.md`` (a section per
workload) and ``OUT_<workload>.png``; every run stays under ``--work``/<workload> (``--reuse``
reads finished runs back instead of running them again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, markdown_table, twa_ray_cli

HERE = Path(__file__).resolve().parent
METHODS = ("sgd_full", "sgd_short", "sgd_sampled", "swa", "ema", "greedy_soup", "twa_t", "twa_v")
CHOSEN = ("twa_chosen", "saved")  # chosen per seed on the hold part of val (see chosen())
WORKLOADS = {"cnn": "configs/mnist1d_cnn.yaml", "mlp": "configs/mnist1d_mlp.yaml"}
BASELINES = ("ema", "swa", "sgd_sampled", "sgd_short")  # the saved model must not lose to these
# two-sided 95 % quantiles of Student's t by degrees of freedom
T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
}


def config_path(workload: str) -> str:
    """The config file of a workload name (``cnn``, ``mlp``) or path."""
    return str(HERE.parent / WORKLOADS[workload]) if workload in WORKLOADS else workload


def workload_name(workload: str) -> str:
    return workload if workload in WORKLOADS else Path(workload).stem


def run_seed(seed: int, args: argparse.Namespace, workload: str) -> dict[str, Any]:
    """``twa-ray run --compare-full`` of ``workload`` for one seed; its metrics.json."""
    work = Path(args.work) / workload_name(workload)
    out = work / f"seed{seed}"
    metrics = out / "metrics.json"
    if args.reuse and metrics.exists():
        return json.loads(metrics.read_text())
    cmd = twa_ray_cli(
        "run",
        "--config",
        config_path(workload),
        "--compare-full",
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--overwrite",
        *args.run_args,
    )
    log = work / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ).returncode
    if rc != 0:
        raise SystemExit(f"seed {seed}: twa-ray run exited {rc}; see {log}")
    return json.loads(metrics.read_text())


def ddp_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The sampling run of ``seed`` as plain DDP (no Ray), with ``--num-samples`` of the run's
    flags (kept under ``--work`` for ``--reuse``)."""
    from ray_tax import plain_ddp

    path = Path(args.work) / "cnn" / f"seed{seed}.ddp.json"
    if args.reuse and path.exists():
        return json.loads(path.read_text())
    flags = args.run_args
    n = int(flags[flags.index("--num-samples") + 1]) if "--num-samples" in flags else None
    res = plain_ddp(argparse.Namespace(num_samples=n, seed=seed))
    path.write_text(json.dumps(res))
    return res


def ray_tax(runs: dict[int, dict[str, Any]], ddp: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean wall seconds of the Ray Train sampling run (``sgd_sampled``) and of plain DDP, and
    the paired mean of their ratio."""
    if not ddp:
        return {}
    pairs = [(runs[s]["methods"]["sgd_sampled"]["wall_s"], d["wall_s"]) for s, d in ddp.items()]
    return {
        "ray_train_s": statistics.mean(r for r, _ in pairs),
        "plain_ddp_s": statistics.mean(d for _, d in pairs),
        "plain_ddp_test_acc": 100 * statistics.mean(d["test_acc"] for d in ddp.values()),
        "ratio": statistics.mean(r / d for r, d in pairs),
    }


def interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval."""
    n = len(xs)
    if n < 2:
        return statistics.mean(xs), math.nan
    return statistics.mean(xs), T95.get(n - 1, 1.96) * statistics.stdev(xs) / math.sqrt(n)


def chosen(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A run's methods plus the two chosen on the hold part of val: ``saved`` (the method
    ``model.safetensors`` holds) and ``twa_chosen`` (TWA-t or TWA-v, the higher on hold; TWA-v on
    a tie, as the product's order). ``saved`` costs what the choice needs, whichever it picks:
    the TWA path's epochs and wall seconds (every savable method comes out of it; the EMA's own
    seconds added)."""
    methods = dict(metrics["methods"])
    saved = metrics["saved_model"]
    twa = max(("twa_v", "twa_t"), key=lambda m: methods[m].get("hold_acc", methods[m]["val_acc"]))
    wall = max(methods[m]["wall_s"] for m in ("twa_t", "twa_v", "ema", "swa") if m in methods)
    methods["twa_chosen"] = {**methods[twa], "name": twa}
    epochs = methods[twa]["epochs_used"]
    methods["saved"] = {**methods[saved], "name": saved, "wall_s": wall, "epochs_used": epochs}
    return methods


def paired(runs: dict[int, dict[str, Any]], a: str, b: str) -> tuple[float, float]:
    """Mean of ``a - b`` test accuracy (points) over the seeds and its 95 % half-width."""
    ms = [chosen(r) for r in runs.values()]
    return interval([100 * (m[a]["test_acc"] - m[b]["test_acc"]) for m in ms if a in m and b in m])


def summarize(runs: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: accuracies, the paired difference to sgd_full, wall seconds and their ratio."""
    rows = []
    all_methods = {s: chosen(r) for s, r in runs.items()}
    for m in (*METHODS, *CHOSEN):
        have = [ms for ms in all_methods.values() if m in ms]
        if not have:
            continue
        acc = [100 * x[m]["test_acc"] for x in have]
        diff, diff_ci = interval(
            [100 * (x[m]["test_acc"] - x["sgd_full"]["test_acc"]) for x in have]
        )
        ratio = [x[m]["wall_s"] / x["sgd_full"]["wall_s"] for x in have]
        rows.append(
            {
                "method": m,
                "seeds": len(have),
                "picked": [x[m]["name"] for x in have] if m in CHOSEN else None,
                "epochs_used": have[0][m]["epochs_used"],
                "test_acc_mean": statistics.mean(acc),
                "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "val_acc_mean": 100 * statistics.mean(x[m]["val_acc"] for x in have),
                "minus_full_mean": diff,
                "minus_full_ci95": diff_ci,
                "wall_s_mean": statistics.mean(x[m]["wall_s"] for x in have),
                "wall_ratio_mean": statistics.mean(ratio),
            }
        )
    return rows


def checks(
    rows: list[dict[str, Any]], runs: dict[int, dict[str, Any]], phases: dict[str, float]
) -> dict[str, Any]:
    """Issue 29's bar: the saved model >= each free baseline (paired mean over the seeds), the
    TWA variant chosen on hold within 0.2 points of full training at <= 60 % of its epochs;
    issue 28's for the wall-clock (the TWA path <= 0.75x the full run, a fixed cost <= 10 s)."""
    by = {r["method"]: r for r in rows}
    twa = by["twa_chosen"]
    saved_minus = {b: paired(runs, "saved", b) for b in BASELINES if b in by}
    epochs_frac = twa["epochs_used"] / by["sgd_full"]["epochs_used"]
    return {
        "saved_picked": by["saved"]["picked"],
        "twa_picked": twa["picked"],
        "saved_minus": {b: {"mean": m, "ci95": h} for b, (m, h) in saved_minus.items()},
        "saved_at_least": {b: m >= 0 for b, (m, _) in saved_minus.items()},
        "minus_full": twa["minus_full_mean"],
        "minus_full_ci95": twa["minus_full_ci95"],
        "within_0.2_of_full": twa["minus_full_mean"] >= -0.2,
        "epochs_frac": epochs_frac,
        "epochs_at_most_0.6": epochs_frac <= 0.6 + 1e-9,
        "wall_ratio": twa["wall_ratio_mean"],
        "wall_ratio_at_most_0.65": twa["wall_ratio_mean"] <= 0.65,
        "wall_ratio_at_most_0.75": twa["wall_ratio_mean"] <= 0.75,
        "fixed_cost_s": phases.get("fixed_cost"),
        "fixed_cost_at_most_10s": phases.get("fixed_cost", math.inf) <= 10.0,
    }


def markdown(
    rows: list[dict[str, Any]], check: dict[str, Any], phases: dict[str, float], head: str
) -> str:
    header = [
        *("method", "epochs used", "test acc % (mean ± std)", "− sgd_full (95 % CI)"),
        *("val acc %", "wall s", "wall / sgd_full"),
    ]
    cells = [
        [
            r["method"],
            f"{r['epochs_used']:g}",
            f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}",
        ]
        + [f"{r['minus_full_mean']:+.2f} ± {r['minus_full_ci95']:.2f}", f"{r['val_acc_mean']:.2f}"]
        + [f"{r['wall_s_mean']:.1f}", f"{r['wall_ratio_mean']:.2f}"]
        for r in rows
    ]
    lines = [head, "", *markdown_table(header, cells)]
    diffs = ", ".join(
        f"{b} {d['mean']:+.2f} ± {d['ci95']:.2f}" for b, d in check["saved_minus"].items()
    )
    lines += [
        "",
        f"`saved` picked per seed: {', '.join(check['saved_picked'])}; `twa_chosen`: "
        f"{', '.join(check['twa_picked'])}.",
        "",
        f"Checks: saved − baseline (paired, points, 95 % CI): {diffs}; >= each: "
        f"{check['saved_at_least']}. twa_chosen {check['minus_full']:+.2f} ± "
        f"{check['minus_full_ci95']:.2f} pt vs full (within 0.2: {check['within_0.2_of_full']}) "
        f"at {100 * check['epochs_frac']:.0f} % of its epochs (<= 60 %: "
        f"{check['epochs_at_most_0.6']}); wall ratio {check['wall_ratio']:.2f} "
        f"(<= 0.65: {check['wall_ratio_at_most_0.65']}; <= 0.75: {check['wall_ratio_at_most_0.75']}); "
        f"fixed cost {check['fixed_cost_s'] or math.nan:.1f} s (<= 10: {check['fixed_cost_at_most_10s']})",
        "",
        *phase_table(phases),
        "",
        "All phases (mean wall seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
    ]
    tax = check.get("ray_tax")
    if tax:
        lines += [
            "",
            f"Ray tax: the sampling run on Ray Train {tax['ray_train_s']:.1f} s (sgd_sampled, Ray "
            f"start included) vs plain PyTorch DDP {tax['plain_ddp_s']:.1f} s (gloo, no Ray; test "
            f"{tax['plain_ddp_test_acc']:.2f} %): {tax['ratio']:.2f}x",
        ]
    return "\n".join(lines) + "\n"


def flat_phases(wall: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``metrics["wall_s"]`` with its nested phases as ``sampling.compute`` etc."""
    out: dict[str, float] = {}
    for k, v in wall.items():
        if isinstance(v, dict):
            out.update(flat_phases(v, f"{prefix}{k}."))
        elif isinstance(v, int | float):
            out[f"{prefix}{k}"] = v
    return out


def mean_phases(runs: dict[int, dict[str, Any]]) -> dict[str, float]:
    flat = [flat_phases(r["wall_s"]) for r in runs.values()]
    keys = [k for k in flat[0] if all(k in f for f in flat)]
    return {k: statistics.mean(f[k] for f in flat) for k in keys}


# the TWA path's wall-clock, phase by phase (issue 28): setup, then the one worker group
PATH_PHASES = (
    ("ray start", "ray_start"),
    ("data preparation (driver)", "data_preparation"),
    ("worker start-up (processes, imports, process group)", "worker_startup"),
    ("sampling: worker setup (data, model)", "sampling.setup"),
    ("sampling: epochs' compute", "sampling.compute"),
    ("sampling: evaluation per epoch", "sampling.evaluation"),
    ("sampling: snapshot I/O", "sampling.snapshot_io"),
    ("sampling: checkpoint I/O", "sampling.checkpoint_io"),
    ("basis build (rank 0)", "basis"),
    ("coefficients: setup (model, B placed)", "coefficients.setup"),
    ("coefficients: SWA evaluation", "coefficients.swa"),
    ("coefficients: compute (TWA steps)", "coefficients.compute"),
    ("coefficients: evaluation (BN, val, test)", "coefficients.evaluation"),
    ("coefficients: checkpoint I/O", "coefficients.checkpoint_io"),
    ("Ray scheduling and teardown (rest of the group)", "group_other"),
    ("TWA path (setup + the group)", "twa_path"),
    ("fixed cost (TWA path minus compute)", "fixed_cost"),
    ("output writing (driver)", "output_writing"),
)


def phase_table(phases: dict[str, float]) -> list[str]:
    """The TWA path's phases (mean wall seconds), for the markdown."""
    cells = [[name, f"{phases[k]:.2f}"] for name, k in PATH_PHASES if k in phases]
    return markdown_table(["phase of the TWA path", "mean wall s"], cells)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        ax.errorbar(
            r["wall_s_mean"], r["test_acc_mean"], yerr=r["test_acc_std"], fmt="o", capsize=3
        )
        ax.annotate(
            r["method"],
            (r["wall_s_mean"], r["test_acc_mean"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("wall seconds of a run producing only that model")
    ax.set_ylabel("test accuracy % (mean ± std)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_workload(args: argparse.Namespace, workload: str) -> tuple[str, dict[str, Any]]:
    """The seeds of one workload: its markdown section and its JSON entry."""
    t0, runs, ddp = time.time(), {}, {}
    load = [os.getloadavg()[0]]
    for seed in args.seeds:
        runs[seed] = run_seed(seed, args, workload)
        if not args.no_ddp and workload == "cnn":  # plain DDP runs the default job (ray_tax.job)
            ddp[seed] = ddp_seed(seed, args)
        load.append(os.getloadavg()[0])
        m = chosen(runs[seed])
        print(
            f"[{time.time() - t0:5.0f} s] {workload} seed {seed}: "
            + " ".join(
                f"{k} {100 * m[k]['test_acc']:.2f}/{m[k]['wall_s']:.0f}s"
                for k in (*METHODS, *CHOSEN)
                if k in m
            ),
            flush=True,
        )
    rows = summarize(runs)
    phases = mean_phases(runs)
    check = {**checks(rows, runs, phases), "ray_tax": ray_tax(runs, ddp)}
    cmd = f"--config {WORKLOADS.get(workload, workload)} {' '.join(args.run_args)}".strip()
    loaded = "" if args.reuse else f" (1-min load average {min(load):.0f}-{max(load):.0f})"
    head = (
        f"## {workload_name(workload)}: `twa-ray run {cmd} --compare-full`\n\n"
        f"Seeds {args.seeds}, {time.strftime('%Y-%m-%d %H:%M')} UTC, CPU {cpu_model()}, "
        f"{os.cpu_count()} cores, shared with other work{loaded}: accuracies are deterministic, "
        "wall seconds are not."
    )
    name = workload_name(workload)
    plot(rows, Path(f"{args.out}_{name}.png"), f"{name}: seeds {args.seeds}")
    entry = {
        "command": head.splitlines()[0],
        "cpu": cpu_model(),
        "load_average": load,
        "seeds": args.seeds,
        "rows": rows,
        "checks": check,
        "phases": phases,
        "runs": {
            s: {
                "methods": r["methods"],
                "saved_model": r["saved_model"],
                "saved_reason": r.get("saved_reason"),
                "wall_s": r["wall_s"],
            }
            for s, r in runs.items()
        },
        "wall_time_s": round(time.time() - t0, 1),
    }
    return markdown(rows, check, phases, head), entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", nargs="+", default=["cnn", "mlp"], help="cnn, mlp or a config")
    p.add_argument("--seeds", nargs="+", type=int, default=[200, 201, 202, 203, 204])
    p.add_argument("--work", default=str(HERE / "_work" / "claims"))
    p.add_argument("--out", default=str(HERE / "claims"), help="writes OUT.json, OUT.md, OUT_*.png")
    p.add_argument("--reuse", action="store_true", help="read finished runs under --work back")
    p.add_argument("--no-ddp", action="store_true", help="skip the plain-DDP run (the Ray tax)")
    p.add_argument("run_args", nargs="*", help="flags for twa-ray run (after --)")
    args = p.parse_args(argv)
    t0, sections, entries = time.time(), [], {}
    for workload in args.workload:
        text, entries[workload_name(workload)] = run_workload(args, workload)
        sections.append(text)
        print(text, flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"workloads": entries}, indent=1))
    title = "# `bench/claims.py`: the promise on held-out seeds, per workload\n\n"
    out.with_suffix(".md").write_text(title + "\n".join(sections))
    print(f"wrote {out}.json/.md in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

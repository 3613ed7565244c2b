"""The paper's epoch-budget claim at CPU scale (results: bench/RESULTS.md, "The paper's claims"): MNIST-1D, MLP and 1-D CNN, 3 seeds.

For every (model, seed) one sampling run of the *full* budget E on Ray Train (``run_sampling``,
2 workers, snapshot every ``--interval`` epochs) gives full-budget SGD and, because the schedule
and the data order depend only on (seed, epoch), the exact trajectory of a run stopped at f*E for
every f. For each window f the candidates are the snapshots of the first f*E epochs, and the
product's own code (``twa_ray.average``: the path of ``twa-ray average``) computes SGD at the
stop, SWA, greedy soup, TWA-t and TWA-v with the default :class:`TWAConfig`.

Epochs used = f*E (+ TWA epochs for TWA); saved = 1 - used / E.

    python bench/claims.py                      # all: ~25 min on 2 cores
    python bench/claims.py --models mlp --seeds 0 --fracs 0.5  # one cell

Writes ``bench/claims.json``, ``bench/claims.md`` and ``bench/claims.png``; sampling runs are
kept under ``--work`` and reused (delete it to re-sample).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from twa_ray.average import compute_baselines, fit_twa, make_loaders
from twa_ray.config import DataConfig, SamplingConfig
from twa_ray.core.layout import Layout
from twa_ray.core.twa import TWAConfig, build_subspace
from twa_ray.data import load_dataset
from twa_ray.models import build_model
from twa_ray.store import CandidateStore

HERE = Path(__file__).resolve().parent
METHODS = ("sgd_full", "sgd_stop", "swa", "greedy_soup", "twa_t", "twa_v")


def sample(model: str, seed: int, args: argparse.Namespace) -> tuple[CandidateStore, list[dict[str, Any]]]:
    """Full-budget SGD on Ray Train with a snapshot every ``args.interval`` epochs (cached)."""
    from twa_ray.pipeline import init_ray
    from twa_ray.ray.sampling import run_sampling

    run_dir = Path(args.work) / f"{model}-s{seed}"
    sampling = SamplingConfig(epochs=args.epochs, sample_frac=1.0, sample_interval=args.interval, num_workers=2)
    run_id = f"claims-{model}-s{seed}"
    # a finished run is read back from its last Ray Train checkpoint without starting workers
    final = run_dir / "ray_train" / f"sampling_{run_id}" / f"checkpoint_epoch{args.epochs:04d}" / "meta.json"
    if final.exists():
        meta = json.loads(final.read_text())
        if meta["config"]["sampling"] == asdict(sampling):
            return CandidateStore(str(run_dir / "candidates")), meta["history"]
    init_ray()
    res = run_sampling(
        DataConfig(model=model, seed=seed), sampling,
        store_uri=str(run_dir / "candidates"), run_dir=str(run_dir), run_id=run_id,
    )  # fmt: skip
    return CandidateStore(res.store_uri), res.history


def evaluate_window(
    store: CandidateStore, history: list[dict[str, Any]], model_name: str, seed: int, frac: float, twa_cfg: TWAConfig
) -> dict[str, dict[str, float]]:
    """Every method on the candidates of the first ``frac * E`` epochs."""
    budget = len(history)
    stop = max(1, math.ceil(frac * budget - 1e-9))
    names = [n for n in store.names() if store.info(n).epoch <= stop + 1e-9]
    splits = load_dataset("mnist1d", val_frac=DataConfig().val_frac, seed=seed)
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=splits.num_classes, input_shape=splits.input_shape)
    layout = Layout.from_module(model)
    loaders = make_loaders(splits, SamplingConfig().batch_size, seed)
    base = compute_baselines(store, model, loaders, names=names)
    rows = {
        "sgd_full": {"test_acc": history[-1]["test_acc"], "epochs_used": budget},
        "sgd_stop": {"test_acc": history[stop - 1]["test_acc"], "epochs_used": stop},
        "swa": {"test_acc": base.swa["test_acc"], "epochs_used": stop},
        "greedy_soup": {"test_acc": base.greedy_soup["test_acc"], "epochs_used": stop},
    }
    subspace = build_subspace(lambda: (store.read(n) for n in names), layout, twa_cfg)
    for mode in ("t", "v"):
        _, acc = fit_twa(model, subspace, twa_cfg, loaders, mode)
        rows[f"twa_{mode}"] = {"test_acc": acc["test_acc"], "epochs_used": stop + twa_cfg.epochs}
    for r in rows.values():
        r["budget_saved"] = 1 - r["epochs_used"] / budget
    rows["_meta"] = {"num_candidates": len(names), "stop_epoch": stop,
                     "full_outside_span": outside_span(store, names, store.names()[-1])}  # fmt: skip
    return rows


def outside_span(store: CandidateStore, names: list[str], target: str) -> float:
    """How much of the way from the last candidate to ``target`` (the full-budget weights) no
    combination of the candidates can reach: ``|r| / |target - last|`` with ``r`` the residual
    of ``target - o`` projected onto span{w_k - o} (float64 least squares, o = their mean)."""
    w = torch.stack([store.read(n).double() for n in names])
    o = w.mean(0)
    goal = store.read(target).double()
    coef = torch.linalg.lstsq((w - o).T, (goal - o).unsqueeze(1)).solution
    r = goal - o - ((w - o).T @ coef).squeeze(1)
    return float(r.norm() / (goal - w[-1]).norm().clamp_min(1e-12))


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (model, frac, method)."""
    out = []
    keys = sorted({(c["model"], c["frac"]) for c in cells})
    for model, frac in keys:
        group = [c for c in cells if c["model"] == model and c["frac"] == frac]
        for m in METHODS:
            accs = [100 * c["rows"][m]["test_acc"] for c in group]
            used = group[0]["rows"][m]["epochs_used"]
            out.append({
                "model": model, "frac": frac, "method": m, "seeds": len(accs),
                "full_outside_span": statistics.mean(c["full_outside_span"] for c in group),
                "test_acc_mean": statistics.mean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "epochs_used": used, "budget_saved_pct": 100 * group[0]["rows"][m]["budget_saved"],
            })  # fmt: skip
    return out


def markdown(summary: list[dict[str, Any]], budget: int) -> str:
    lines = [
        f"| model | f | method | test acc % (mean ± std) | epochs used of {budget} | budget saved % |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['model']} | {r['frac']} | {r['method']} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} "
            f"| {r['epochs_used']:g} | {r['budget_saved_pct']:.1f} |"
        )
    return "\n".join(lines)


def targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets per (model, f): TWA-v within 0.2 and TWA-t within 0.5 points of full
    SGD, both above SWA."""
    by = {(r["model"], r["frac"], r["method"]): r for r in summary}
    out = []
    for model, frac in sorted({(r["model"], r["frac"]) for r in summary}):
        full, swa = by[model, frac, "sgd_full"]["test_acc_mean"], by[model, frac, "swa"]["test_acc_mean"]
        t, v = by[model, frac, "twa_t"], by[model, frac, "twa_v"]
        out.append({
            "model": model, "frac": frac, "twa_saved_pct": v["budget_saved_pct"],
            "twa_v_gap": v["test_acc_mean"] - full, "twa_t_gap": t["test_acc_mean"] - full,
            "twa_v_beats_swa": v["test_acc_mean"] > swa, "twa_t_beats_swa": t["test_acc_mean"] > swa,
            "twa_v_within_0.2": v["test_acc_mean"] >= full - 0.2, "twa_t_within_0.5": t["test_acc_mean"] >= full - 0.5,
            "full_outside_span": v["full_outside_span"],
        })  # fmt: skip
    return out


def plot(summary: list[dict[str, Any]], path: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in summary})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    markers = {0.4: "o", 0.5: "s", 0.6: "^"}
    colors = dict(zip(METHODS, ("black", "gray", "tab:orange", "tab:green", "tab:blue", "tab:red")))
    for ax, model in zip(axes[0], models):
        for r in (r for r in summary if r["model"] == model):
            label = f"{r['method']}" if r["frac"] == 0.5 or r["method"] == "sgd_full" else None
            ax.errorbar(r["epochs_used"], r["test_acc_mean"], yerr=r["test_acc_std"], fmt=markers.get(r["frac"], "D"),
                        color=colors[r["method"]], label=label, capsize=3)  # fmt: skip
        ax.set_title(f"MNIST-1D {model}: marker o/s/^ = f 0.4/0.5/0.6")
        ax.set_xlabel(f"epochs used (budget {budget})")
        ax.set_ylabel("test accuracy % (mean ± std, 3 seeds)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn1d"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fracs", nargs="+", type=float, default=[0.4, 0.5, 0.6])
    p.add_argument("--epochs", type=int, default=SamplingConfig().epochs, help="full budget E")
    p.add_argument("--interval", type=int, default=SamplingConfig().sample_interval, help="epochs between snapshots")
    p.add_argument("--twa", default="{}", help='JSON overrides of the TWA config, e.g. \'{"lr": 0.1}\'')
    p.add_argument("--sample-only", action="store_true", help="run (or finish) the sampling runs and stop")
    p.add_argument("--work", default=str(HERE / "_work" / "claims"))
    p.add_argument("--out", default=str(HERE / "claims"), help="writes OUT.json, OUT.md, OUT.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # small models: a second intra-op thread costs more than it gives
    twa_cfg = replace(TWAConfig(), **json.loads(args.twa))
    t0 = time.time()
    cells = []
    for model in args.models:
        for seed in args.seeds:
            ts = time.time()
            store, history = sample(model, seed, args)
            print(f"[{time.time() - t0:5.0f}s] sampled {model} seed {seed}: {len(store)} candidates, "
                  f"full SGD {100 * history[-1]['test_acc']:.2f}% ({time.time() - ts:.0f} s)", flush=True)  # fmt: skip
            if args.sample_only:
                continue
            for frac in args.fracs:
                ts = time.time()
                rows = evaluate_window(store, history, model, seed, frac, twa_cfg)
                meta = rows.pop("_meta")
                cells.append({"model": model, "seed": seed, "frac": frac, "rows": rows, **meta})
                accs = " ".join(f"{m} {100 * rows[m]['test_acc']:.2f}" for m in METHODS)
                print(f"[{time.time() - t0:5.0f}s]   f={frac} K={meta['num_candidates']}: {accs} ({time.time() - ts:.0f} s)",
                      flush=True)  # fmt: skip
    if args.sample_only:
        return 0
    summary = summarize(cells)
    table = markdown(summary, args.epochs)
    checks = targets(summary)
    print(table)
    for c in checks:
        print(f"{c['model']} f={c['frac']}: TWA-v {c['twa_v_gap']:+.2f} (≤0.2 under: {c['twa_v_within_0.2']}), "
              f"TWA-t {c['twa_t_gap']:+.2f} (≤0.5 under: {c['twa_t_within_0.5']}), "
              f"beat SWA: v {c['twa_v_beats_swa']} t {c['twa_t_beats_swa']}, saved {c['twa_saved_pct']:.1f}%, "
              f"{100 * c['full_outside_span']:.0f}% of the way to full SGD outside the candidates' span")  # fmt: skip
    out = Path(args.out)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": "2-core x86_64 CPU", "budget_epochs": args.epochs,
        "interval": args.interval, "twa": twa_cfg.to_dict(), "wall_time_s": round(time.time() - t0, 1),
        "summary": summary, "targets": checks, "cells": cells,
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [table, "", "| model | f | saved % | TWA-v − full | TWA-t − full | beat SWA (v, t) | way to full SGD outside the span |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in checks:
        lines.append(f"| {c['model']} | {c['frac']} | {c['twa_saved_pct']:.1f} | {c['twa_v_gap']:+.2f} | {c['twa_t_gap']:+.2f} "
                     f"| {c['twa_v_beats_swa']}, {c['twa_t_beats_swa']} | {100 * c['full_outside_span']:.0f}% |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(summary, out.with_suffix(".png"), args.epochs)
    print(f"wrote {out}.json/.md/.png in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

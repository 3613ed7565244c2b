"""Ray Tune sweeps over TWA's knobs that sample once per group of trials: ``twa-ray sweep``.

    plan (driver, no Ray): the space -> trials; trials grouped by their sampling knobs
      -> phase 1 (driver, Ray Train): one sampling run per group, at the group's finest interval
         and (epoch intervals) longest sample_frac, into <sampling_dir>/<group>/candidates
      -> phase 2 (Ray Tune): one trial per config: its subset of the group's candidates, TWA
         epoch by epoch in the trial's process, tune.report(val_acc) per epoch, ASHA on val_acc
      -> trials.parquet / trials.csv, best.yaml, sweep.png, summary.json

Why sampling can be shared. ``sample_interval`` only decides which weights are written, never
the SGD trajectory: a run with interval ``s = k*b`` writes exactly the candidates of the run with
interval ``b`` whose epoch (step) is a multiple of ``s``, plus the final one. ``sample_frac`` only
decides where SGD stops on the schedule of the full budget E, so with epoch intervals a shorter
run is a prefix of a longer one. Trials that differ only in these two knobs (and in TWA knobs)
therefore share one sampling run; every other sampling knob (lr, batch size, seed, data, model,
workers, ...) starts a run of its own.

Why the search space is resolved on the driver. The sampling runs must be known before the
trials start (they run on Ray Train with the whole cluster, then the cheap trials share it), so
the driver draws the trials with Ray Tune's own variant generator (grid x num_samples, random
draws seeded) and hands Tune the resolved list as a grid. ASHA, resources, concurrency, the
results and ``Tuner.restore`` are Tune's; a model-based searcher (which proposes trials on the
fly) does not fit this two-phase plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from twa_ray.config import TRAJECTORY_FREE_FIELDS, RunConfig, SweepConfig, config_from_dict
from twa_ray.pipeline import _check_out_dir, _claim_out_dir, _ensure_abs, init_ray, storage_of
from twa_ray.redact import redact
from twa_ray.report import (
    atomic_path,
    format_table,
    plot_sweep,
    prepare_out_dir,
    write_json,
    write_table,
)
from twa_ray.storage import Storage, check_multi_node, join_uri, open_storage
from twa_ray.store import CandidateStore
from twa_ray.store.arrow import CandidateInfo

log = logging.getLogger("twa_ray")

__all__ = ["plan_sweep", "select_candidates", "run_sweep", "to_tune_space"]

PLAN_FILE = "plan.json"  # the resolved trials and sampling groups (a resumed sweep reuses them)
DONE_FILE = "sampling_done.json"  # next to a finished sampling run: its candidates and cost
EXPERIMENT = "sweep"  # Tune experiment name under <storage>/tune


# --------------------------------------------------------------------------- the plan


def to_tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """``{grid|choice|uniform|loguniform: ..}`` specs -> Ray Tune search-space objects."""
    from ray import tune

    make = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    out = {}
    for knob, spec in space.items():
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in make:
            kind, values = next(iter(spec.items()))
            out[knob] = make[kind](values)
        else:
            out[knob] = spec  # already a Tune object
    return out


def _draw_trials(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The knob values of every trial: the grid, ``num_samples`` times, random knobs drawn anew
    each time from a generator seeded by ``cfg.seed``."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    space = dict(cfg.space)
    if cfg.base.mode == "both" and "mode" not in space:
        space["mode"] = {"grid": ["t", "v"]}  # a trial trains one model: 'both' means try both
    tune_space = to_tune_space(space)
    rng = np.random.RandomState(cfg.seed)
    trials = []
    for _ in range(cfg.num_samples):
        for _, resolved in generate_variants(tune_space, random_state=rng):
            trials.append({k: _plain(resolved[k]) for k in space})
    return trials


def _plain(v: Any) -> Any:
    """numpy scalars -> Python (for JSON, YAML and the dataclasses' validation)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def _apply(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(base))
    for knob, value in params.items():
        if "." in knob:
            section, name = knob.split(".", 1)
            d[section][name] = value
        else:
            d[knob] = value
    return d


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def plan_sweep(cfg: SweepConfig, *, sampling_dir: str) -> dict[str, Any]:
    """Resolve the trials and group them by sampling run (pure: no Ray, nothing written).

    Returns a JSON-friendly dict: ``trials`` (index, params, config, group, interval, unit,
    sample_epochs) and ``groups`` (key -> the data and sampling configs that run, its run id,
    run dir, store and trial indices).

    Raises:
        ValueError: a trial config is invalid, or a trial would get fewer than 2 candidates.
    """
    base = cfg.base.to_dict()
    trials: list[dict[str, Any]] = []
    errors: list[str] = []
    for i, params in enumerate(_draw_trials(cfg)):
        try:
            run = config_from_dict(_apply(base, params))
        except (ValueError, TypeError) as e:
            errors.append(f"trial {i} {params}: {e}")
            continue
        if run.mode not in ("t", "v"):
            errors.append(f"trial {i}: mode={run.mode!r}; a trial trains one model: 't' or 'v'")
        s = run.sampling
        if s.interval_unit == "epoch":
            count = s.sample_epochs // s.sample_interval + (
                s.sample_epochs % s.sample_interval != 0
            )
            if count < 2:
                errors.append(
                    f"trial {i} {params}: sample_interval={s.sample_interval} epochs over "
                    f"{s.sample_epochs} sampled epochs gives {count} candidate; TWA needs at least 2"
                )
        trials.append({"index": i, "params": params, "config": run})
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError("invalid sweep: " + "; ".join(errors[:5]) + more)

    # group by every sampling knob except the interval (and, for epoch intervals, the fraction)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        run: RunConfig = t["config"]
        s = asdict(run.sampling)
        for name in ("sample_interval", *TRAJECTORY_FREE_FIELDS):
            s.pop(name)
        if run.sampling.interval_unit == "epoch":
            s.pop("sample_frac")
        key = {"data": asdict(run.data), "sampling": s}
        if not cfg.reuse_sampling:
            key["trial"] = t["index"]
        by_key.setdefault(_hash(key), []).append(t)

    groups: dict[str, dict[str, Any]] = {}
    for members in by_key.values():
        runs = [m["config"] for m in members]
        longest = max(runs, key=lambda r: (r.sampling.sample_epochs, r.sampling.sample_frac))
        e_max = longest.sampling.sample_epochs
        # the finest interval that holds every member's snapshots (and, for epoch intervals,
        # the last epoch of every shorter member: a run always snapshots its final epoch)
        parts = [r.sampling.sample_interval for r in runs]
        if longest.sampling.interval_unit == "epoch":
            parts += [r.sampling.sample_epochs for r in runs if r.sampling.sample_epochs < e_max]
        interval = math.gcd(*parts)
        sampling = dataclasses.replace(longest.sampling, sample_interval=interval)
        ident = {"data": asdict(longest.data), "sampling": asdict(sampling)}
        for name in TRAJECTORY_FREE_FIELDS:
            ident["sampling"].pop(name)
        if not cfg.reuse_sampling:
            ident["trial"] = members[0]["index"]
        key = _hash(ident)
        run_dir = join_uri(sampling_dir, key)
        groups[key] = {
            "key": key, "data": asdict(longest.data), "sampling": asdict(sampling),
            "run_id": f"sweep-{key}", "run_dir": run_dir, "store": join_uri(run_dir, "candidates"),
            "sample_epochs": e_max, "trials": [m["index"] for m in members],
        }  # fmt: skip
        for m in members:
            m["group"] = key
    return {
        "trials": [
            {
                "index": t["index"],
                "params": t["params"],
                "config": t["config"].to_dict(),
                "group": t["group"],
                "interval": t["config"].sampling.sample_interval,
                "unit": t["config"].sampling.interval_unit,
                "sample_epochs": t["config"].sampling.sample_epochs,
                "twa_epochs": t["config"].twa.epochs,
            }  # fmt: skip
            for t in trials
        ],
        "groups": groups,
    }


def select_candidates(
    infos: Sequence[CandidateInfo], *, interval: int, unit: str, sample_epochs: int
) -> list[str]:
    """The candidates a sampling run with ``interval`` (and ``sample_epochs``) would have written,
    picked from a finer run of the same trajectory: every snapshot at a multiple of ``interval``
    plus the final one.

    >>> from twa_ray.store.arrow import CandidateInfo as C
    >>> infos = [C(f"c{e}", 10 * e, float(e), "", 0, "r") for e in range(1, 7)]
    >>> select_candidates(infos, interval=2, unit="epoch", sample_epochs=5)
    ['c2', 'c4', 'c5']
    """
    infos = sorted(infos, key=lambda i: i.step)
    if unit == "epoch":
        kept = [
            i for i in infos
            if round(i.epoch) <= sample_epochs
            and (round(i.epoch) % interval == 0 or round(i.epoch) == sample_epochs)
        ]  # fmt: skip
    else:
        kept = [i for i in infos if i.step % interval == 0 or i is infos[-1]]
    return [i.name for i in kept]


# --------------------------------------------------------------------------- phase 1: sampling


def _run_groups(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run (or find finished) the sampling run of every group; fill in each trial's candidates.
    Returns per group: ``ran`` (in this call), ``wall_time_s`` (of the run, when it ran),
    ``sample_epochs``, ``num_candidates``."""
    from twa_ray.config import DataConfig, SamplingConfig

    done: dict[str, dict[str, Any]] = {}
    todo: dict[str, Any] = {}
    for key, g in plan["groups"].items():
        run_dir = open_storage(g["run_dir"])
        record = run_dir.read_json(DONE_FILE) if run_dir.exists(DONE_FILE) else None
        store = CandidateStore(g["store"], create=True)
        if record is None or not set(record["candidates"]) <= set(store.names()):
            s = SamplingConfig(**g["sampling"])
            log.info(
                "sampling group %s (%d trials): %d epochs, every %d %s(s)",
                key, len(g["trials"]), s.sample_epochs, s.sample_interval, s.interval_unit,
            )  # fmt: skip
            todo[key] = (DataConfig(**g["data"]), s, g["store"], g["run_dir"], g["run_id"])
        else:
            log.info("sampling group %s: reusing the finished run in %s", key, g["run_dir"])
            done[key] = {**record, "ran": False}
    for key, res in _sample(todo).items():
        s = todo[key][1]
        record = {
            "run_id": res.run_id, "candidates": res.candidates, "sample_epochs": s.sample_epochs,
            "wall_time_s": round(res.wall_time_s, 2), "final_metrics": res.final_metrics,
        }  # fmt: skip
        open_storage(plan["groups"][key]["run_dir"]).write_json(DONE_FILE, record)
        done[key] = {**record, "ran": True}
    for key, g in plan["groups"].items():
        store = CandidateStore(g["store"])
        infos = [store.info(n) for n in done[key]["candidates"]]
        for i in g["trials"]:
            t = plan["trials"][i]
            t["store"] = g["store"]
            t["candidates"] = select_candidates(
                infos, interval=t["interval"], unit=t["unit"], sample_epochs=t["sample_epochs"]
            )
    few = [t["index"] for t in plan["trials"] if len(t["candidates"]) < 2]
    if few:
        raise ValueError(
            f"trial(s) {few} get fewer than 2 candidates from their sampling run; lower "
            "sample_interval or raise epochs / sample_frac"
        )
    return done


def _sample(todo: dict[str, Any]) -> dict[str, Any]:
    """Run the sampling runs ``key -> run_sampling arguments``: in the driver one after another,
    or, when the cluster has CPUs for more than one worker group, each from a Ray task of its
    own (the Train driver needs no CPU; it stays on the driver's node, as Ray Train's
    controller does), as many at once as fit."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from twa_ray.ray.sampling import run_sampling

    need = max((a[1].num_workers * a[1].cpus_per_worker for a in todo.values()), default=1.0)
    room = int(ray.cluster_resources().get("CPU", 0.0) // need)
    if len(todo) <= 1 or room <= 1:
        return {
            key: run_sampling(data, s, store_uri=store, run_dir=run_dir, run_id=run_id)
            for key, (data, s, store, run_dir, run_id) in todo.items()
        }
    log.info("sampling %d groups, %d at a time", len(todo), min(room, len(todo)))
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(run_sampling)
    results: dict[str, Any] = {}
    waiting, running = list(todo), {}
    while waiting or running:
        while waiting and len(running) < room:
            key = waiting.pop(0)
            data, s, store, run_dir, run_id = todo[key]
            ref = remote.remote(data, s, store_uri=store, run_dir=run_dir, run_id=run_id)
            running[ref] = key
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            results[running.pop(ref)] = ray.get(ref)
    return results


# --------------------------------------------------------------------------- phase 2: Tune


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.config['trial']['index']:04d}_{trial.trial_id}"


def _check_trial_gpus(gpus_per_trial: float, *, local: bool) -> None:
    """Refuse (a local Ray) or warn (a cluster that may scale up) when no node has the GPUs of
    one trial: Tune would otherwise wait for them forever."""
    import ray

    have = max((n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
    if gpus_per_trial <= have:
        return
    msg = (f"--gpus-per-trial {gpus_per_trial:g}: no Ray node has that many GPUs (the most on one "
           f"node is {have:g}); lower --gpus-per-trial or set it to 0")  # fmt: skip
    if local:
        raise ValueError(msg)
    log.warning("%s (waiting for the cluster to scale up)", msg)


def _tuner(cfg: SweepConfig, plan: dict[str, Any], storage: Storage, *, restore: bool) -> Any:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from twa_ray.ray.tune_trial import twa_trial

    resources = {"cpu": cfg.cpus_per_trial, **({"gpu": cfg.gpus_per_trial} if cfg.gpus_per_trial else {})}
    trainable = tune.with_resources(tune.with_parameters(twa_trial, plan=plan), resources)
    tune_dir = storage.child("tune")
    path, fs = tune_dir.child(EXPERIMENT).path, tune_dir.train_args()["storage_filesystem"]
    if restore and tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("restoring the Tune experiment in %s", tune_dir.join(EXPERIMENT))
        return tune.Tuner.restore(
            path, trainable=trainable, restart_errored=True, storage_filesystem=fs
        )
    max_t = max(math.ceil(t["twa_epochs"]) for t in plan["trials"])
    if cfg.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=max_t, grace_period=min(cfg.grace_period, max_t),
            reduction_factor=cfg.reduction_factor,
        )  # fmt: skip
    else:
        scheduler = FIFOScheduler()
    concurrent = cfg.max_concurrent
    if concurrent is None:  # leave a CPU to the driver and Ray's own processes
        cpus = ray.cluster_resources().get("CPU", 1.0)
        concurrent = max(1, int((cpus - 1) // cfg.cpus_per_trial))
    trials = [{"index": t["index"], **t["params"]} for t in plan["trials"]]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode="max",
            scheduler=scheduler,
            num_samples=1,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=_trial_dirname,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            # checkpoints are a few KB of alpha; keeping all of them spares Tune the forced
            # experiment snapshot after every report that num_to_keep would trigger
            name=EXPERIMENT,
            **tune_dir.train_args(),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=1),
        ),  # fmt: skip
    )


# --------------------------------------------------------------------------- the sweep


def run_sweep(
    cfg: SweepConfig,
    *,
    out: str,
    address: str | None = None,
    sampling_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Plan, sample once per group, run the trials on Ray Tune, write the outputs to ``out``.

    Args:
        cfg: the base config, the space and the Tune options.
        out: output directory (local or shared between the nodes of a cluster).
        address: Ray cluster address (default: ``RAY_ADDRESS`` or a local Ray).
        sampling_dir: where the sampling runs live (default ``out/sampling``); a directory shared
            between sweeps reuses every finished run whose config matches.
        resume: continue the sweep in ``out`` (its plan, finished sampling runs, and the Tune
            experiment through ``Tuner.restore``); ``overwrite``: delete ``out`` first.

    Returns:
        the summary written to ``out/summary.json``.
    """
    start = time.time()
    out_path = prepare_out_dir(out).resolve()
    storage, shared_paths = storage_of(cfg.base, str(out_path))
    claim = {"resume": resume, "overwrite": overwrite, "kind": "sweep", "given": cfg.base.storage}
    if sampling_dir:
        shared_paths["--sampling-dir"] = sampling_dir
    _check_out_dir(storage, **claim)  # refuse early, before starting Ray
    init_ray(address)
    check_multi_node(shared_paths, shared_fs=cfg.base.shared_fs)
    _check_trial_gpus(cfg.gpus_per_trial, local=address is None and not os.environ.get("RAY_ADDRESS"))
    sweep_id = _claim_out_dir(storage, **claim, out=out_path)
    if resume and storage.exists(PLAN_FILE):
        plan = storage.read_json(PLAN_FILE)
        log.info("resuming sweep %s: %d trials", sweep_id, len(plan["trials"]))
        if json.loads(json.dumps(cfg.to_dict()))["space"] != plan["sweep"]["space"]:
            log.warning(
                "--resume continues the saved plan; the space given now differs and is "
                "ignored (--overwrite starts a new sweep)"
            )
    else:
        root = _ensure_abs(sampling_dir) if sampling_dir else storage.join("sampling")
        base = cfg.base
        if base.data.data_root:  # trials and workers may run elsewhere: absolute paths
            base = dataclasses.replace(
                base,
                data=dataclasses.replace(base.data, data_root=_ensure_abs(base.data.data_root)),
            )
        cfg = dataclasses.replace(cfg, base=base)
        plan = plan_sweep(cfg, sampling_dir=root)
        plan.update(
            sweep_id=sweep_id,
            sweep=cfg.to_dict(),
            cpus_per_trial=cfg.cpus_per_trial,
            gpus_per_trial=cfg.gpus_per_trial,
            select_frac=cfg.select_frac,
        )
        storage.write_json(PLAN_FILE, plan)
    n_trials, n_groups = len(plan["trials"]), len(plan["groups"])
    log.info("sweep %s: %d trials, %d sampling run(s)", sweep_id, n_trials, n_groups)

    # -- phase 1: one sampling run per group (Ray Train, the whole cluster) ------------------
    t_sampling = time.time()
    groups = _run_groups(plan)
    storage.write_json(PLAN_FILE, plan)  # now with every trial's candidates
    sampling_wall = time.time() - t_sampling

    # -- phase 2: the trials (Ray Tune, ASHA on val_acc) ---------------------------------------
    t_tune = time.time()
    tuner = _tuner(cfg, plan, storage, restore=resume)
    grid = tuner.fit()
    tune_wall = time.time() - t_tune

    # -- outputs -----------------------------------------------------------------------------
    rows = _rows(grid, plan)
    summary = _summarize(rows, plan, groups, sweep_id=sweep_id, out=storage.join("tune"))
    summary.update(
        wall_time_s=round(time.time() - start, 1), sampling_wall_s=round(sampling_wall, 1),
        tune_wall_s=round(tune_wall, 1),
    )  # fmt: skip
    knobs = sorted({k for t in plan["trials"] for k in t["params"]})
    write_table(out_path / "trials", rows)
    plot_sweep(out_path / "sweep.png", rows, knobs, best_index=summary["best"]["index"])
    _write_best_yaml(
        out_path / "best.yaml", plan["trials"][summary["best"]["index"]], summary, out_path
    )
    write_json(out_path / "summary.json", summary)
    if cfg.base.storage and storage.uri != str(out_path):  # --out: a local copy of the outputs
        storage.upload_outputs(out_path)

    cols = ("index", *knobs, "status", "twa_epochs", "val_acc")
    ranked = sorted(rows, key=lambda r: 1.0 if math.isnan(r["val_acc"]) else -r["val_acc"])
    print(format_table(ranked, cols))
    best, s = summary["best"], summary["sampling"]
    print(
        f"best trial {best['index']} {best['params']}: val_acc {best['val_acc']:.4f} "
        f"(selection split); its test accuracy, reported separately: {summary['best_test_acc']:.4f}"
    )
    print(
        f"sampling: {s['runs']} run(s), {s['epochs_run']} epochs for {n_trials} trials "
        f"(a sweep sampling per trial: {s['epochs_naive']} epochs; saved {100 * s['epochs_saved_frac']:.0f}%)"
    )
    print(f"outputs in {out_path} ({summary['wall_time_s']:.0f} s)")
    return summary


def _rows(grid: Any, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial: its knobs, status and last reported metrics."""
    rows = []
    for k in range(len(grid)):
        r = grid[k]
        idx = int(r.config["trial"]["index"])
        t = plan["trials"][idx]
        m = r.metrics or {}
        status = "error" if r.error else ("completed" if m.get("finished") else "stopped")
        rows.append(
            {
                "index": idx,
                "trial_id": m.get("trial_id", ""),
                "group": t["group"],
                **t["params"],
                "status": status,
                "val_acc": m.get("val_acc", math.nan),
                "val_loss": m.get("val_loss", math.nan),
                "test_acc": m.get("test_acc", math.nan),
                "twa_epochs": m.get("twa_epoch", 0.0),
                "epochs_used": m.get("epochs_used", math.nan),
                "num_candidates": len(t["candidates"]),
                "sample_epochs": t["sample_epochs"],
                "time_s": m.get("time_total_s", math.nan),
                "node_id": m.get("node_id", ""),
                "error": str(r.error).splitlines()[0][:300] if r.error else "",
            }  # fmt: skip
        )
    return sorted(rows, key=lambda r: r["index"])


def _summarize(
    rows: list[dict[str, Any]],
    plan: dict[str, Any],
    groups: dict[str, dict[str, Any]],
    *,
    sweep_id: str,
    out: str,
) -> dict[str, Any]:
    scored = [r for r in rows if r["status"] != "error" and not math.isnan(r["val_acc"])]
    if not scored:
        first = next((r["error"] for r in rows if r["error"]), "no metrics reported")
        raise RuntimeError(
            f"every trial of sweep {sweep_id} failed (first: {first}); see {out}"
        )
    # full-length trials first: a config is judged at the epochs best.yaml will run
    completed = [r for r in scored if r["status"] == "completed"] or scored
    best = max(completed, key=lambda r: (r["val_acc"], -r["index"]))
    trials = plan["trials"]
    naive = sum(t["sample_epochs"] for t in trials)
    run = sum(g["sample_epochs"] for g in groups.values())
    # a sweep that samples per trial pays each group's measured wall time per member, pro rata
    naive_wall = sum(
        groups[t["group"]]["wall_time_s"] * t["sample_epochs"] / groups[t["group"]]["sample_epochs"]
        for t in trials
    )
    return {
        "sweep_id": sweep_id,
        "metric": "val_acc: accuracy on the selection part of the val split (no trial fits on it)",
        "best": {
            k: best[k] for k in ("index", "trial_id", "val_acc", "val_loss", "twa_epochs", "group")
        }
        | {"params": trials[best["index"]]["params"], "config": trials[best["index"]]["config"]},
        "best_test_acc": best["test_acc"],
        "counts": {
            "trials": len(rows),
            "completed": sum(r["status"] == "completed" for r in rows),
            "stopped_early": sum(r["status"] == "stopped" for r in rows),
            "errored": sum(r["status"] == "error" for r in rows),
            "sampling_runs": len(groups),
            "sampling_runs_this_call": sum(g["ran"] for g in groups.values()),
        },
        "sampling": {
            "runs": len(groups),
            "epochs_run": run,
            "epochs_naive": naive,
            "epochs_saved_frac": 1.0 - run / naive,
            "wall_s": round(sum(g["wall_time_s"] for g in groups.values()), 1),
            "wall_s_naive_estimate": round(naive_wall, 1),
        },
        "twa_epochs_run": round(sum(r["twa_epochs"] for r in rows), 2),
        "twa_epochs_planned": sum(math.ceil(t["twa_epochs"]) for t in trials),
    }


def _write_best_yaml(path: Path, trial: dict[str, Any], summary: dict[str, Any], out: Path) -> None:
    """The best trial's full run config; ``twa-ray run --config best.yaml`` runs it."""
    import yaml

    cfg = dict(trial["config"], out=str(out / "best_run"), store=None)
    config_from_dict(cfg)  # the file must load
    head = (
        f"# twa-ray run --config {path}\n"
        f"# best of sweep {summary['sweep_id']}: trial {trial['index']} {trial['params']}\n"
        f"# val_acc {summary['best']['val_acc']:.4f} (selection split); test_acc {summary['best_test_acc']:.4f}\n"
    )
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(head)
        yaml.safe_dump(redact(cfg), f, sort_keys=False)  # URIs without credentials

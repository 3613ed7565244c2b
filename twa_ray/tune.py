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
the driver draws the trials with Ray Tune's semantics (grid x num_samples, random draws seeded;
:mod:`twa_ray.tune_plan`), before Ray starts, and hands Tune the resolved list as a grid. ASHA,
resources, concurrency, the results and ``Tuner.restore`` are Tune's; a model-based searcher
(which proposes trials on the fly) does not fit this two-phase plan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from twa_ray import outdir
from twa_ray.config import SweepConfig, config_from_dict
from twa_ray.core.atomic import atomic_path
from twa_ray.errors import RUNTIME, TwaError, describe
from twa_ray.ray.ray_internals import trial_exception
from twa_ray.redact import redact
from twa_ray.report import format_table, plot_sweep, write_json, write_table
from twa_ray.storage import Storage, absolute, check_multi_node, open_storage
from twa_ray.store import CandidateStore
from twa_ray.tune_plan import PlannedTrial, SamplingGroup, SweepPlan, plan_sweep, select_candidates

log = logging.getLogger("twa_ray")

__all__ = ["run_sweep"]

PLAN_FILE = (
    "plan.json"  # SweepPlan.to_dict(): the trials and sampling groups (--resume reuses them)
)
DONE_FILE = "sampling_done.json"  # next to a finished sampling run: its candidates and cost
EXPERIMENT = "sweep"  # Tune experiment name under <storage>/tune


# --------------------------------------------------------------------------- the plan file


def _write_plan(storage: Storage, plan: SweepPlan) -> None:
    storage.write_json(PLAN_FILE, plan.to_dict())


def _read_plan(storage: Storage) -> SweepPlan:
    """The plan a sweep saved in its storage (``plan.json``)."""
    return SweepPlan.from_dict(storage.read_json(PLAN_FILE))


# --------------------------------------------------------------------------- phase 1: sampling


def _finished_runs(plan: SweepPlan) -> tuple[dict[str, dict[str, Any]], list[SamplingGroup]]:
    """The groups whose sampling run has finished (``key -> its record``), and the others."""
    done: dict[str, dict[str, Any]] = {}
    todo = []
    for key, g in plan.groups.items():
        run_dir = open_storage(g.run_dir)
        record = run_dir.read_json(DONE_FILE) if run_dir.exists(DONE_FILE) else None
        store = CandidateStore(g.store, create=True)
        if record is None or not set(record["candidates"]) <= set(store.names()):
            s = g.sampling
            log.info(
                "sampling group %s (%d trials): %d epochs, every %d %s(s)",
                key,
                len(g.trials),
                s.sample_epochs,
                s.sample_interval,
                s.interval_unit,
            )
            todo.append(g)
        else:
            log.info("sampling group %s: reusing the finished run in %s", key, g.run_dir)
            done[key] = {**record, "ran": False}
    return done, todo


def _choose_candidates(plan: SweepPlan, done: dict[str, dict[str, Any]]) -> SweepPlan:
    """Each trial's candidates: those its own interval and fraction would have written."""
    chosen = {}
    for key, g in plan.groups.items():
        store = CandidateStore(g.store)
        infos = [store.info(n) for n in done[key]["candidates"]]
        for i in g.trials:
            s = plan.trials[i].config.sampling
            chosen[i] = select_candidates(
                infos,
                interval=s.sample_interval,
                unit=s.interval_unit,
                sample_epochs=s.sample_epochs,
            )
    few = [i for i, names in sorted(chosen.items()) if len(names) < 2]
    if few:
        raise ValueError(
            f"trial(s) {few} get fewer than 2 candidates from their sampling run; lower "
            "sample_interval or raise epochs / sample_frac"
        )
    return plan.with_candidates(chosen)


def _run_groups(plan: SweepPlan) -> tuple[SweepPlan, dict[str, dict[str, Any]]]:
    """Run (or find finished) the sampling run of every group. Returns the plan with every
    trial's candidates, and per group: ``ran`` (in this call), ``wall_time_s`` (of the run, when
    it ran), ``sample_epochs``, ``num_candidates``."""
    done, todo = _finished_runs(plan)
    for g, res in zip(todo, _sample(todo)):
        record = {
            "run_id": res.run_id,
            "candidates": res.candidates,
            "sample_epochs": g.sample_epochs,
            "wall_time_s": round(res.wall_time_s, 2),
            "final_metrics": res.final_metrics,
        }
        open_storage(g.run_dir).write_json(DONE_FILE, record)
        done[g.key] = {**record, "ran": True}
    return _choose_candidates(plan, done), done


def _sample(todo: list[SamplingGroup]) -> list[Any]:
    """Run the groups' sampling runs (results in order): in the driver one after another, or,
    when the cluster has CPUs for more than one worker group, each from a Ray task of its own
    (the Train driver needs no CPU; it stays on the driver's node, as Ray Train's controller
    does), as many at once as fit."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from twa_ray.ray.sampling import run_sampling

    def args(g: SamplingGroup) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (g.data, g.sampling), {
            "store_uri": g.store,
            "run_dir": g.run_dir,
            "run_id": g.run_id,
        }

    need = max((g.sampling.num_workers * g.sampling.cpus_per_worker for g in todo), default=1.0)
    room = int(ray.cluster_resources().get("CPU", 0.0) // need)
    if len(todo) <= 1 or room <= 1:
        return [run_sampling(*a, **kw) for a, kw in map(args, todo)]
    log.info("sampling %d groups, %d at a time", len(todo), min(room, len(todo)))
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(_sampling_task)
    results: dict[int, Any] = {}
    waiting, running = list(range(len(todo))), {}
    while waiting or running:
        while waiting and len(running) < room:
            k = waiting.pop(0)
            a, kw = args(todo[k])
            running[remote.remote(*a, **kw)] = k
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            results[running.pop(ref)] = ray.get(ref)
    return [results[k] for k in range(len(todo))]


def _sampling_task(*args: Any, **kwargs: Any) -> Any:
    """``run_sampling`` as a Ray task: the log records of its process masked first."""
    from twa_ray.ray.sampling import run_sampling
    from twa_ray.redact import install

    install()
    return run_sampling(*args, **kwargs)


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
    msg = (
        f"--gpus-per-trial {gpus_per_trial:g}: no Ray node has that many GPUs (the most on one "
        f"node is {have:g}); lower --gpus-per-trial or set it to 0"
    )
    if local:
        raise ValueError(msg)
    log.warning("%s (waiting for the cluster to scale up)", msg)


def _scheduler(cfg: SweepConfig, plan: SweepPlan) -> Any:
    """ASHA on the trials' TWA epochs (``training_iteration``), or FIFO: every trial to the end."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler != "asha":
        return FIFOScheduler()
    max_t = max(math.ceil(t.twa_epochs) for t in plan.trials)
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=min(cfg.grace_period, max_t),
        reduction_factor=cfg.reduction_factor,
    )


def _tuner(cfg: SweepConfig, plan: SweepPlan, storage: Storage, *, restore: bool) -> Any:
    import ray
    from ray import tune

    from twa_ray.ray.tune_trial import twa_trial

    resources = {
        "cpu": cfg.cpus_per_trial,
        **({"gpu": cfg.gpus_per_trial} if cfg.gpus_per_trial else {}),
    }
    trainable = tune.with_resources(tune.with_parameters(twa_trial, plan=plan), resources)
    tune_dir = storage.child("tune")
    path, fs = tune_dir.child(EXPERIMENT).path, tune_dir.train_args()["storage_filesystem"]
    if restore and tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("restoring the Tune experiment in %s", tune_dir.join(EXPERIMENT))
        return tune.Tuner.restore(
            path, trainable=trainable, restart_errored=True, storage_filesystem=fs
        )
    concurrent = cfg.max_concurrent
    if concurrent is None:  # leave a CPU to the driver and Ray's own processes
        cpus = ray.cluster_resources().get("CPU", 1.0)
        concurrent = max(1, int((cpus - 1) // cfg.cpus_per_trial))
    trials = [{"index": t.index, **t.params} for t in plan.trials]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode="max",
            scheduler=_scheduler(cfg, plan),
            num_samples=1,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            # checkpoints are a few KB of alpha; keeping all of them spares Tune the forced
            # experiment snapshot after every report that num_to_keep would trigger
            name=EXPERIMENT,
            **tune_dir.train_args(),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )


# --------------------------------------------------------------------------- the sweep


def run_sweep(
    cfg: SweepConfig, req: outdir.Request, *, sampling_dir: str | None = None
) -> dict[str, Any]:
    """Plan, sample once per group, run the trials on Ray Tune, write the outputs to ``--out``.

    Args:
        cfg: the base config, the space and the Tune options.
        req: the outputs as the command line asked (``--out``: local or shared between the
            nodes of a cluster; ``resume``: continue the sweep there, its plan, finished sampling
            runs, and the Tune experiment through ``Tuner.restore``; ``overwrite``: delete the
            previous output first) and Ray's ``--address``.
        sampling_dir: where the sampling runs live (default ``<storage>/sampling``); a directory
            shared between sweeps reuses every finished run whose config matches.

    Returns:
        the summary written to ``out/summary.json``.
    """
    start = time.time()
    req = dataclasses.replace(
        req,
        command="sweep",
        storage=cfg.base.storage,
        inputs=(("--data-root", cfg.base.data.data_root),),
    )
    with outdir.claimed(req) as outputs:
        storage, out_path = outputs.storage, outputs.out
        assert storage is not None and out_path is not None
        if req.resume and storage.exists(PLAN_FILE):
            plan = _saved_plan(storage, cfg)
        else:
            plan = _new_plan(cfg, storage, sampling_dir)  # a bad space is refused before Ray
        _start(cfg, outputs, sampling_dir)
        plan = dataclasses.replace(plan, sweep_id=outputs.run_id)
        _write_plan(storage, plan)
        log.info(
            "sweep %s: %d trials, %d sampling run(s)",
            plan.sweep_id,
            len(plan.trials),
            len(plan.groups),
        )

        # -- phase 1: one sampling run per group (Ray Train, the whole cluster) --------------
        t_sampling = time.time()
        plan, groups = _run_groups(plan)
        _write_plan(storage, plan)  # now with every trial's candidates
        sampling_wall = time.time() - t_sampling

        # -- phase 2: the trials (Ray Tune, ASHA on val_acc) -----------------------------------
        t_tune = time.time()
        grid = _tuner(cfg, plan, storage, restore=req.resume).fit()
        tune_wall = time.time() - t_tune

        # -- outputs -------------------------------------------------------------------------
        rows = _rows(grid, plan)
        summary = _summarize(rows, plan, groups, out=storage.join("tune"), first=_first_error(grid))
        summary.update(
            wall_time_s=round(time.time() - start, 1),
            sampling_wall_s=round(sampling_wall, 1),
            tune_wall_s=round(tune_wall, 1),
        )
        _write_outputs(plan, rows, summary, outputs)
    _print_results(rows, plan, summary, out_path)
    return summary


def _new_plan(cfg: SweepConfig, storage: Storage, sampling_dir: str | None) -> SweepPlan:
    """:func:`~twa_ray.tune_plan.plan_sweep` with absolute paths: trials and workers may run
    elsewhere."""
    root = absolute(sampling_dir) if sampling_dir else storage.join("sampling")
    base = cfg.base
    if base.data.data_root:
        data = dataclasses.replace(base.data, data_root=absolute(base.data.data_root))
        base = dataclasses.replace(base, data=data)
    return plan_sweep(dataclasses.replace(cfg, base=base), sampling_dir=root)


def _saved_plan(storage: Storage, cfg: SweepConfig) -> SweepPlan:
    plan = _read_plan(storage)
    log.info("resuming sweep %s: %d trials", plan.sweep_id, len(plan.trials))
    if json.loads(json.dumps(cfg.to_dict()["space"])) != plan.space:
        log.warning(
            "--resume continues the saved plan; the space given now differs and is "
            "ignored (--overwrite starts a new sweep)"
        )
    return plan


def _start(cfg: SweepConfig, outputs: outdir.Outputs, sampling_dir: str | None) -> None:
    """Start (or join) Ray, check the cluster can run the sweep, claim the outputs."""
    from twa_ray.connect import connect_ray

    assert outputs.storage is not None
    local = connect_ray(outputs.req.address)
    shared_paths = {
        ("--storage" if cfg.base.storage else "--out (the default --storage)"): outputs.storage.uri,
        **({"--store": cfg.base.store} if cfg.base.store else {}),
        **({"--sampling-dir": sampling_dir} if sampling_dir else {}),
    }
    check_multi_node(shared_paths, shared_fs=cfg.base.shared_fs)
    _check_trial_gpus(cfg.gpus_per_trial, local=local)
    outputs.claim()


def _knobs(plan: SweepPlan) -> list[str]:
    return sorted({k for t in plan.trials for k in t.params})


def _write_outputs(
    plan: SweepPlan, rows: list[dict[str, Any]], summary: dict[str, Any], outputs: outdir.Outputs
) -> None:
    """trials.parquet / .csv, sweep.png, best.yaml, summary.json; with ``--storage`` elsewhere,
    copied to its ``outputs/`` too."""
    out_path = outputs.out
    assert out_path is not None
    write_table(out_path / "trials", rows)
    plot_sweep(out_path / "sweep.png", rows, _knobs(plan), best_index=summary["best"]["index"])
    best = plan.trials[summary["best"]["index"]]
    _write_best_yaml(out_path / "best.yaml", best, summary, out_path)
    write_json(out_path / "summary.json", summary)
    outputs.publish()


def _print_results(
    rows: list[dict[str, Any]], plan: SweepPlan, summary: dict[str, Any], out_path: Path
) -> None:
    cols = ("index", *_knobs(plan), "status", "twa_epochs", "val_acc")
    ranked = sorted(rows, key=lambda r: 1.0 if math.isnan(r["val_acc"]) else -r["val_acc"])
    print(format_table(ranked, cols))
    best, s = summary["best"], summary["sampling"]
    print(
        f"best trial {best['index']} {best['params']}: val_acc {best['val_acc']:.4f} "
        f"(selection split); its test accuracy, reported separately: {summary['best_test_acc']:.4f}"
    )
    free = summary.get("free_average")
    if free and free["beats_every_trial"]:
        print(
            f"note: the free average {free['method']} of trial {free['trial']}'s candidates scores "
            f"val_acc {free['val_acc']:.4f}, above every trial: TWA does not help this sweep"
        )
    print(
        f"sampling: {s['runs']} run(s), {s['epochs_run']} epochs for {len(plan.trials)} trials "
        f"(a sweep sampling per trial: {s['epochs_naive']} epochs; saved {100 * s['epochs_saved_frac']:.0f}%)"
    )
    print(f"outputs in {out_path} ({summary['wall_time_s']:.0f} s)")


def _rows(grid: Any, plan: SweepPlan) -> list[dict[str, Any]]:
    """One row per trial: its knobs, status and last reported metrics."""
    rows = []
    for k in range(len(grid)):
        r = grid[k]
        t = plan.trials[int(r.config["trial"]["index"])]
        m = r.metrics or {}
        status = "error" if r.error else ("completed" if m.get("finished") else "stopped")
        rows.append(
            {
                "index": t.index,
                "trial_id": m.get("trial_id", ""),
                "group": t.group,
                **t.params,
                "status": status,
                "val_acc": m.get("val_acc", math.nan),
                "val_loss": m.get("val_loss", math.nan),
                "test_acc": m.get("test_acc", math.nan),
                "twa_epochs": m.get("twa_epoch", 0.0),
                "epochs_used": m.get("epochs_used", math.nan),
                "num_candidates": len(t.candidates),
                "sample_epochs": t.sample_epochs,
                "time_s": m.get("time_total_s", math.nan),
                "node_id": m.get("node_id", ""),
                "error": _error_line(r.error),
                **_best_free(m),
            }
        )
    return sorted(rows, key=lambda r: r["index"])


def _best_free(metrics: dict[str, Any]) -> dict[str, Any]:
    """The trial's best free average (SWA, the last candidate) on the select split, as its
    coefficient phase scored them to choose its start (``free_<name>_acc``)."""
    free = {k[5:-4]: v for k, v in metrics.items() if k.startswith("free_") and k.endswith("_acc")}
    if not free:
        return {"free_best": "", "free_best_acc": math.nan}
    name = max(free, key=lambda n: free[n])
    return {"free_best": name, "free_best_acc": free[name]}


def free_average_summary(rows: list[dict[str, Any]], best_val_acc: float) -> dict[str, Any] | None:
    """The best free average of the sweep's sampling runs on the select split (SWA or the last
    candidate of any trial's candidates), and whether it beats every trial (``best_val_acc``:
    the best trial's); None when no trial scored one."""
    scored = [r for r in rows if not math.isnan(r.get("free_best_acc", math.nan))]
    if not scored:
        return None
    top = max(scored, key=lambda r: (r["free_best_acc"], -r["index"]))
    return {
        "method": top["free_best"],
        "trial": top["index"],
        "val_acc": top["free_best_acc"],
        "beats_every_trial": top["free_best_acc"] > best_val_acc,
    }


def _error_line(error: BaseException | None) -> str:
    """A trial's error in one line (its :class:`~twa_ray.errors.TwaError` line when it has one)."""
    if error is None:
        return ""
    e = trial_exception(error)
    return (e.line if isinstance(e, TwaError) else str(error).splitlines()[0])[:300]


def _first_error(grid: Any) -> TwaError | None:
    """The first failed trial's error, as a :class:`~twa_ray.errors.TwaError`."""
    for k in range(len(grid)):
        if grid[k].error:
            return describe(trial_exception(grid[k].error) or grid[k].error)
    return None


def _summarize(
    rows: list[dict[str, Any]],
    plan: SweepPlan,
    groups: dict[str, dict[str, Any]],
    *,
    out: str,
    first: TwaError | None = None,
) -> dict[str, Any]:
    scored = [r for r in rows if r["status"] != "error" and not math.isnan(r["val_acc"])]
    if not scored:  # the first trial's error, in its class (a diverged TWA lr is bad input)
        error = first or TwaError("no metrics reported", RUNTIME)
        raise TwaError(
            f"every trial of sweep {plan.sweep_id} failed (first: {error.line}); see {out}",
            error.kind,
            False,
            error.details,
        )
    # full-length trials first: a config is judged at the epochs best.yaml will run
    completed = [r for r in scored if r["status"] == "completed"] or scored
    best = max(completed, key=lambda r: (r["val_acc"], -r["index"]))
    trials = plan.trials
    naive = sum(t.sample_epochs for t in trials)
    run = sum(g["sample_epochs"] for g in groups.values())
    # a sweep that samples per trial pays each group's measured wall time per member, pro rata
    naive_wall = sum(
        groups[t.group]["wall_time_s"] * t.sample_epochs / groups[t.group]["sample_epochs"]
        for t in trials
    )
    return {
        "sweep_id": plan.sweep_id,
        "metric": "val_acc: accuracy on the selection part of the val split (no trial fits on it)",
        "best": {
            k: best[k] for k in ("index", "trial_id", "val_acc", "val_loss", "twa_epochs", "group")
        }
        | {
            "params": dict(trials[best["index"]].params),
            "config": trials[best["index"]].config.to_dict(),
        },
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
        "free_average": free_average_summary(rows, best["val_acc"]),
        "twa_epochs_run": round(sum(r["twa_epochs"] for r in rows), 2),
        "twa_epochs_planned": sum(math.ceil(t.twa_epochs) for t in trials),
    }


def _write_best_yaml(path: Path, trial: PlannedTrial, summary: dict[str, Any], out: Path) -> None:
    """The best trial's full run config; ``twa-ray run --config best.yaml`` runs it."""
    import yaml

    cfg = dict(trial.config.to_dict(), out=str(out / "best_run"), store=None)
    config_from_dict(cfg)  # the file must load
    head = (
        f"# twa-ray run --config {path}\n"
        f"# best of sweep {summary['sweep_id']}: trial {trial.index} {dict(trial.params)}\n"
        f"# val_acc {summary['best']['val_acc']:.4f} (selection split); test_acc {summary['best_test_acc']:.4f}\n"
    )
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(head)
        yaml.safe_dump(redact(cfg), f, sort_keys=False)  # URIs without credentials

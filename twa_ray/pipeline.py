"""One end-to-end run on Ray: ``twa-ray run``, a recipe of four steps (torchtune style)::

    setup               data and model on the driver, Ray connected, outputs claimed
    learn               ONE Ray Train worker group (twa_ray.ray.run_loop): sampling over
                        sample_frac * E epochs -> candidate store (pyarrow), the quantized
                        subspace -> shards in the object store, TWA-t / TWA-v, SWA evaluated
    baselines           SGD at the stop (sgd_sampled), SWA, greedy soup, EMA,
                        (--compare-full) SGD over E and SGD on a schedule compressed to TWA's epochs
    write               metrics.json, model, coefficients, plots, the table

The epoch budget counts every epoch of SGD plus the TWA epochs; the saving is
``1 - epochs_used / E``. Wall-clock is counted too: ``metrics["wall_s"]`` holds each phase's
seconds and every method's ``wall_s`` is what a run producing only that model takes on this
cluster (Ray start and data included), so ``time_saved = 1 - wall_s / wall_s(sgd_full)``
(a ``--resume``d run counts what this process ran).

The recipe runs inside :func:`twa_ray.outdir.claimed`: the inputs, ``--out`` and the storage
are checked before it starts, and released when it ends.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from twa_ray import outdir
from twa_ray.config import DataConfig, RunConfig, SamplingConfig
from twa_ray.core.baselines import greedy_soup
from twa_ray.core.evaluate import BN_BATCH, evaluate, make_scorer
from twa_ray.core.layout import Layout, load_flat_
from twa_ray.data import load_data
from twa_ray.data.loaders import make_loader
from twa_ray.models import build_model
from twa_ray.redact import redact
from twa_ray.report import (
    SAVABLE_BY,
    best_method,
    check_finite,
    choose_saved,
    format_summary,
    format_table,
    plot_accuracy,
    write_outputs,
)
from twa_ray.storage import Storage, absolute, check_multi_node
from twa_ray.store import CandidateStore

if TYPE_CHECKING:  # the Ray layer is imported when a step runs (importing Ray is slow)
    from twa_ray.ray.coeff_group import TWAResult
    from twa_ray.ray.run_loop import RunOutcome
    from twa_ray.ray.sampling import SamplingResult

log = logging.getLogger("twa_ray")
_T = TypeVar("_T")

__all__ = [
    "run_pipeline",
    "setup",
    "learn",
    "baselines",
    "write",
    "check_resources",
]


def check_resources(s: SamplingConfig, *, fixed: bool) -> None:
    """Refuse a worker group the Ray cluster cannot hold, naming what it has and the fix.

    ``fixed``: the cluster cannot grow (a local Ray); otherwise (``--address`` / ``RAY_ADDRESS``,
    possibly an autoscaling cluster) only warn: the run waits for the autoscaler.
    """
    import ray

    have = ray.cluster_resources()
    problems = []
    need_cpu = s.num_workers * s.cpus_per_worker
    cpus = have.get("CPU", 0.0)
    if need_cpu > cpus + 1e-9:
        fit = int(cpus // s.cpus_per_worker)
        problems.append(
            f"{s.num_workers} workers x {s.cpus_per_worker:g} CPU need {need_cpu:g} CPUs but the Ray "
            f"cluster has {cpus:g} CPUs; use --workers {max(fit, 1)}"
            + (f" or --cpus-per-worker {cpus / s.num_workers:.2g}" if cpus > 0 else "")
        )
    gpus = have.get("GPU", 0.0)
    if s.use_gpu and s.num_workers > gpus:
        problems.append(
            f"{s.num_workers} GPU workers need {s.num_workers} GPUs but the Ray cluster has "
            f"{gpus:g}; lower --workers or drop --use-gpu"
        )
    if not problems:
        return
    if fixed:
        raise ValueError("; ".join(problems))
    log.warning("%s (waiting for the cluster to scale up)", "; ".join(problems))


@dataclass(frozen=True)
class _Run:
    """What :func:`setup` resolves and builds once; every later step reads it."""

    cfg: RunConfig  # with absolute local paths (workers may run in another directory)
    outputs: outdir.Outputs  # --out and the storage, claimed
    splits: Any  # the dataset on the driver (greedy soup)
    model: torch.nn.Module  # the architecture on the driver: the best method's weights go here
    layout: Layout
    given_store: str | None  # --store as given (None: the default under the storage), saved
    data_ref: Any = None  # the dataset in the object store (ray.group.ship_splits), or None

    @property
    def out(self) -> Path:
        assert self.outputs.out is not None
        return self.outputs.out

    @property
    def storage(self) -> Storage:
        assert self.outputs.storage is not None
        return self.outputs.storage

    @property
    def run_id(self) -> str:
        assert self.outputs.run_id is not None
        return self.outputs.run_id

    @property
    def work(self) -> str:
        """Ray Train storage of the worker groups."""
        return self.storage.join("work")


@dataclass(frozen=True)
class _Learned:
    """What the run's worker group produced: the sampling result, the coefficient outcome
    (every mode's result and every method's weights), the group's phase seconds, and this
    run's candidates in the store."""

    outcome: RunOutcome
    store: CandidateStore
    names: list[str]

    @property
    def sampled(self) -> SamplingResult:
        return self.outcome.sampled

    @property
    def results(self) -> dict[str, TWAResult]:
        return self.outcome.coeff.results


@dataclass(frozen=True)
class _Methods:
    """Each method's accuracies, epochs used, budget saved and wall seconds (the metrics'
    ``methods``), the history of SGD over the full budget (``--compare-full``), if it ran, the
    wall seconds of every phase (the metrics' ``wall_s``) and the free averages' weights."""

    methods: dict[str, dict[str, Any]]
    full_history: list[dict[str, float]] | None
    wall: dict[str, Any]
    states: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    """The driver's free averages' weights (``ema``, ``sgd_sampled``: state dicts, BN included)."""


def run_pipeline(cfg: RunConfig, req: outdir.Request | None = None) -> dict[str, Any]:
    """Sample, average, evaluate and report; returns the metrics written to ``metrics.json``.
    ``req``: how the command line asked for the outputs (default: a new run in ``cfg.out``)."""
    start, wall = time.time(), _Stopwatch()
    req = req or outdir.Request("run", cfg.out, cfg.storage)
    req = dataclasses.replace(req, inputs=(("--data-root", cfg.data.data_root),))
    with outdir.claimed(req) as outputs:
        run = wall("setup", setup, cfg, outputs, wall=wall)
        learned = learn(run)
        methods = baselines(run, learned, wall=wall.seconds)
        return write(run, learned, methods, start=start)


class _Stopwatch:
    """``wall(name, fn, *args)`` calls ``fn`` and adds its wall seconds to ``seconds[name]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def setup(cfg: RunConfig, outputs: outdir.Outputs, *, wall: _Stopwatch | None = None) -> _Run:
    """With the outputs checked: load the data and model on the driver while Ray starts (see
    :func:`_prepare_and_connect`), check the cluster, claim the outputs, then ship the dataset
    to the workers through the object store (:func:`~twa_ray.ray.group.ship_splits`). ``wall``
    gains ``data_preparation`` and ``ray_start`` (they overlap for MNIST-1D)."""
    wall = wall or _Stopwatch()
    from twa_ray.ray.data_root import check_data_root_on_nodes
    from twa_ray.ray.group import ship_splits

    assert outputs.storage is not None and outputs.out is not None
    # workers may run in another directory: every local path they see is absolute
    data_root = absolute(cfg.data.data_root) if cfg.data.data_root else None
    given_store = absolute(cfg.store) if cfg.store else None  # saved: --config repeats the run
    shared_paths = {
        ("--storage" if cfg.storage else "--out (the default --storage)"): outputs.storage.uri,
        **({"--store": cfg.store} if cfg.store else {}),
    }
    cfg = dataclasses.replace(
        cfg,
        out=str(outputs.out),
        store=given_store or outputs.storage.join("candidates"),
        data=dataclasses.replace(cfg.data, data_root=data_root),
    )
    splits, model, local = _prepare_and_connect(cfg.data, outputs.req.address, wall)
    check_resources(cfg.sampling, fixed=local)
    check_multi_node(shared_paths, shared_fs=cfg.shared_fs)
    check_data_root_on_nodes(cfg.data)
    outputs.claim()
    layout = Layout.from_module(model)
    return _Run(
        cfg,
        outputs,
        splits=splits,
        model=model,
        layout=layout,
        given_store=given_store,
        data_ref=ship_splits(splits, cfg.data),
    )


def _prepare_and_connect(
    d: DataConfig, address: str | None, wall: _Stopwatch
) -> tuple[Any, torch.nn.Module, bool]:
    """The dataset and the model on the driver, and Ray connected (whether it is local).

    A generated dataset (MNIST-1D: no file to read, no user code, its arguments checked with
    the config) with a built-in model is prepared in a thread while Ray starts: the data cost
    no wall-clock. Anything else (files, a user function or model) is loaded first, so its
    errors still come before Ray starts; a built-in model that refuses MNIST-1D's shape, found
    after Ray started, stops that Ray before the error leaves (nothing else changed).
    A local Ray starts without the dashboard: a run reads nothing from it (sweeps keep it:
    Tune's early stopping needs its State API)."""
    import ray

    from twa_ray.connect import connect_ray
    from twa_ray.models import MODELS

    if not (d.dataset == "mnist1d" and d.model in MODELS):
        splits, model = wall("data_preparation", _data_and_model, d)
        return splits, model, wall("ray_start", connect_ray, address, dashboard=False)
    started = not ray.is_initialized()
    prepared = _in_thread(wall, "data_preparation", _data_and_model, d)
    try:
        local = wall("ray_start", connect_ray, address, dashboard=False)
        splits, model = prepared()
    except BaseException:
        if started and ray.is_initialized():
            ray.shutdown()
        raise
    return splits, model, local


def _data_and_model(d: DataConfig) -> tuple[Any, torch.nn.Module]:
    """The dataset and the model built for it; a bad name or a missing root is one clear error
    here, not a failure inside every Ray Train worker."""
    splits = load_data(d)
    model = build_model(d.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
    return splits, model


def _in_thread(fn: Callable[..., _T], *args: Any) -> Callable[[], _T]:
    """Start ``fn(*args)`` in a daemon thread (a Ctrl-C does not wait for it); the returned
    function waits for it and returns its result or raises its exception."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name="twa-ray-data", daemon=True)
    thread.start()

    def wait() -> _T:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]  # type: ignore[no-any-return]

    return wait


def learn(run: _Run) -> _Learned:
    """Sampling, the basis and the coefficients in ONE Ray Train worker group (see
    :mod:`twa_ray.ray.run_loop`): ``sample_frac * E`` epochs of the full-budget schedule, then
    TWA-t and/or TWA-v on the candidates' subspace."""
    from twa_ray.ray.coeff_group import CoeffGroupConfig
    from twa_ray.ray.run_loop import run_path

    s, modes = run.cfg.sampling, _modes(run.cfg)
    log.info(
        "one worker group: sampling (%d of %d epochs) -> basis -> TWA-%s on %d workers, run %s",
        s.sample_epochs,
        s.epochs,
        "/".join(modes),
        s.num_workers,
        run.run_id,
    )
    outcome = run_path(
        run.cfg.data,
        s,
        run.cfg.twa,
        CoeffGroupConfig.of_sampling(s, modes),
        store_uri=run.cfg.store_uri,
        run_dir=run.work,
        run_id=run.run_id,
        data_ref=run.data_ref,
    )
    store = CandidateStore(run.cfg.store_uri)
    names = [n for n in store.names() if store.info(n).run_id == run.run_id]
    log.info(
        "one worker group done in %.0f s: %d candidates, TWA-%s: %s",
        outcome.wall_s["group"],
        len(names),
        "/".join(modes),
        format_summary(outcome.coeff.subspace),
    )
    return _Learned(outcome, store, names)


def baselines(run: _Run, learned: _Learned, *, wall: dict[str, float]) -> _Methods:
    """Every method's accuracies, epochs used and wall seconds: SGD at the stop
    (``sgd_sampled``: the final SGD weights, the last candidate), SWA, greedy soup, EMA, TWA
    and (``--compare-full``) SGD over the full budget E and SGD on the same schedule compressed
    to TWA's epochs (``sgd_short``). ``budget_saved = 1 - epochs_used / E``; ``wall`` (the
    phases timed so far) gains the baselines' own seconds."""
    s, twa_epochs = run.cfg.sampling, run.cfg.twa.epochs
    sampled, results = learned.sampled, learned.results
    first = next(iter(results.values()))
    stopwatch = _Stopwatch()
    loaders = _driver_loaders(run.splits, run.cfg)
    last = sampled.read_final_state()
    methods: dict[str, dict[str, Any]] = {
        "sgd_sampled": {
            **_accs(sampled.history[-1]),
            **_hold_acc(run.model, last, loaders),
            "epochs_used": s.sample_epochs,
        }
    }
    states = {"sgd_sampled": last}
    if first.swa is not None:
        methods["swa"] = {**_accs(first.swa), "epochs_used": s.sample_epochs}
    if run.cfg.greedy_soup:
        soup = stopwatch(
            "greedy_soup",
            _greedy_soup,
            learned.store,
            learned.names,
            run.model,
            run.layout,
            loaders,
        )
        methods["greedy_soup"] = {**soup, "epochs_used": s.sample_epochs}
    ema = stopwatch("ema", _ema, sampled, run.model, loaders)
    if ema is not None:
        methods["ema"] = {**ema, "epochs_used": s.sample_epochs}
        states["ema"] = {k: v.clone() for k, v in run.model.state_dict().items()}
    for mode, res in results.items():
        methods[f"twa_{mode}"] = {
            "test_acc": res.test_acc,
            "val_acc": res.val_acc,
            **({} if res.hold_acc is None else {"hold_acc": res.hold_acc}),
            "epochs_used": s.sample_epochs + twa_epochs,
            "bytes_allreduced_per_step": res.bytes_allreduced_per_step,
            "alpha_identical": res.alpha_identical,
            "steps": res.steps,
        }
    full_history = None
    if run.cfg.compare_full:
        short_epochs = s.sample_epochs + math.ceil(twa_epochs)
        short = stopwatch("sgd_short", _sgd_run, run, short_epochs, "short")
        methods["sgd_short"] = {**_accs(short[-1]), "epochs_used": short_epochs}
        full_history = stopwatch("sgd_full", _sgd_run, run, s.epochs, "full")
        methods["sgd_full"] = {**_accs(full_history[-1]), "epochs_used": s.epochs}
    phases = {
        **wall,
        **_group_phases(learned.outcome.wall_s),
        **stopwatch.seconds,
        "sampling_epochs": sampled.epoch_time_s,
    }
    _add_wall(methods, phases, results)
    for m in methods.values():
        m["budget_saved"] = 1.0 - m["epochs_used"] / s.epochs
    return _Methods(methods, full_history, phases, states)


def _group_phases(seconds: dict[str, float]) -> dict[str, Any]:
    """The worker group's phases for ``metrics["wall_s"]``: ``twa_group`` (the driver's seconds
    of the fit), ``worker_startup``, ``sampling`` and ``coefficients`` (rank 0's seconds of
    their parts: setup, compute, snapshot_io, evaluation, checkpoint_io, swa), ``basis`` and
    ``group_other`` (the rest: Ray's scheduling, polling and teardown)."""
    out: dict[str, Any] = {
        "twa_group": seconds["group"],
        "worker_startup": seconds["worker_startup"],
    }
    for key, v in seconds.items():
        if "/" in key:
            phase, part = key.split("/", 1)
            out.setdefault(phase, {})[part] = v
        elif key not in ("group", "worker_startup"):
            out[key] = v
    timed = sum(v for k, v in seconds.items() if k != "group")
    out["group_other"] = seconds["group"] - timed
    return out


def _add_wall(
    methods: dict[str, dict[str, Any]], phases: dict[str, Any], results: dict[str, TWAResult]
) -> None:
    """Each method's ``wall_s``: the seconds of the phases a run producing only that model goes
    through here, and ``time_saved`` against ``sgd_full`` when it ran. The TWA path is setup
    (data and Ray) plus the one worker group; a method's run skips the other methods' own parts:
    ``sgd_sampled`` the basis and the coefficient phase, SWA the modes, each mode the other
    modes and the SWA evaluation. ``fixed_cost``: the TWA path minus its compute (the epochs,
    their evaluation, the coefficient steps, the final evaluations)."""
    first = next(iter(results.values()))
    swa_s = (first.swa or {}).get("time_s", 0.0)
    modes = {f"twa_{m}": r.mode_time_s for m, r in results.items()}
    sampling, coeff = phases.get("sampling", {}), phases.get("coefficients", {})
    twa_path = phases["setup"] + phases["twa_group"]
    compute = sum(sampling.get(k, 0.0) for k in ("compute", "evaluation")) + sum(
        coeff.get(k, 0.0) for k in ("compute", "evaluation", "swa")
    )
    phases.update(
        coefficient_modes=modes, swa=swa_s, twa_path=twa_path, fixed_cost=twa_path - compute
    )
    walls = {
        "sgd_sampled": twa_path - phases.get("basis", 0.0) - sum(coeff.values()),
        "swa": twa_path - sum(modes.values()),
        **{k: twa_path - sum(modes.values()) + v - swa_s for k, v in modes.items()},
    }
    walls.update(
        {k: walls["sgd_sampled"] + phases[k] for k in ("greedy_soup", "ema") if k in phases},
        **{k: phases["setup"] + phases[k] for k in ("sgd_short", "sgd_full") if k in phases},
    )
    full = walls["sgd_full"] if "sgd_full" in methods else None
    for name, m in methods.items():
        m["wall_s"] = round(walls[name], 1)
        m["time_saved"] = None if full is None else 1.0 - walls[name] / full


def _sgd_run(run: _Run, epochs: int, tag: str) -> list[dict[str, float]]:
    """The history of plain SGD over ``epochs`` on the sampling run's schedule shape, data,
    seed and workers: the whole budget (``tag`` 'full') or TWA's epochs ('short')."""
    from twa_ray.ray.sampling import run_sampling

    s = dataclasses.replace(
        run.cfg.sampling,
        epochs=epochs,
        sample_frac=1.0,
        sample_interval=epochs,
        interval_unit="epoch",
        ema=False,
    )
    res = run_sampling(
        run.cfg.data,
        s,
        store_uri=run.storage.join(f"{tag}_candidates"),
        run_dir=run.work,
        run_id=f"{run.run_id}-{tag}",
        data_ref=run.data_ref,
    )
    return res.history


def write(run: _Run, learned: _Learned, methods: _Methods, *, start: float) -> dict[str, Any]:
    """The saved model (``--save``, or the best on the hold part of val among TWA-t, TWA-v,
    EMA, SWA and the last iterate: :func:`~twa_ray.report.choose_saved`), metrics.json,
    coefficients, plots and the table; a copy in ``--storage`` when it is elsewhere."""
    t0 = time.perf_counter()
    cfg, out, results = run.cfg, run.out, learned.results
    saved, reason = choose_saved(methods.methods, save=cfg.save, available=SAVABLE_BY["run"])
    coeff = learned.outcome.coeff
    best: torch.nn.Module | None = run.model
    if saved in methods.states:
        run.model.load_state_dict(methods.states[saved])
    elif saved in coeff.sharded:  # written sharded by the workers: copied last, never joined
        best = None
    else:
        coeff.weights[saved].load_into_(run.model)
    metrics = _metrics(run, learned, methods.methods, best=saved, reason=reason)
    coefficients = {f"twa_{m}": r.alpha for m, r in results.items()}
    check_finite(best, coefficients)  # NaN/Inf: nothing is written
    points = {
        k: (v["epochs_used"], v["test_acc"]) for k, v in methods.methods.items() if k != "sgd_full"
    }
    history = learned.sampled.history
    plot_accuracy(out / "accuracy.png", history, points, full_history=methods.full_history)
    # output writing: the model loaded, the checks and the plot (metrics.json and the files
    # written with it come after; wall_time_s counts them)
    wall = {**methods.wall, "output_writing": time.perf_counter() - t0}
    metrics["wall_s"] = {k: _round(v) for k, v in wall.items()}
    metrics["wall_time_s"] = round(time.time() - start, 1)
    write_outputs(
        out,
        metrics=metrics,
        best_model=best,
        coefficients=coefficients,
        block_labels=learned.outcome.coeff.block_labels,
        candidate_names=learned.names,
        config=dataclasses.replace(cfg, store=run.given_store),
    )
    if best is None:  # the index last: a reader finds every shard it names
        from twa_ray.ray.fsdp_output import copy_output

        copy_output(coeff.checkpoint, saved, str(out))
    run.outputs.publish()  # --out is the local copy of <storage>/outputs
    _print_table(methods.methods)
    copy = f", and in {redact(run.storage.join('outputs'))}" if cfg.storage else ""
    print(f"outputs in {out} ({metrics['wall_time_s']:.0f} s){copy}")
    return metrics


def _metrics(
    run: _Run,
    learned: _Learned,
    methods: dict[str, dict[str, Any]],
    *,
    best: str,
    reason: str = "",
) -> dict[str, Any]:
    """metrics.json (``wall_s`` and ``wall_time_s`` are added last)."""
    budget = run.cfg.sampling.epochs
    epochs_used = run.cfg.sampling.sample_epochs + run.cfg.twa.epochs
    first = next(iter(learned.results.values()))
    return {
        "run_id": run.run_id,
        "methods": methods,
        **best_method(methods, saved_model=best, saved_reason=reason),
        "budget_epochs": budget,
        "epochs_used": epochs_used,
        "budget_saved": 1.0 - epochs_used / budget,
        "data": run.splits.summary(),  # split sizes and val_digest: runs compare by them
        "num_candidates": len(learned.names),
        "numel": run.layout.numel,
        "subspace": learned.outcome.coeff.subspace,
        "bytes_allreduced_per_step": first.bytes_allreduced_per_step,
        # placement of B (and why), bytes held / sent per step, the packed-kernel path of rank 0
        "coefficient_phase": first.extra,
        "sampling_history": learned.sampled.history,
    }


def _print_table(methods: dict[str, dict[str, Any]]) -> None:
    columns = (
        "method",
        "test_acc",
        "val_acc",
        "epochs_used",
        "budget_saved_%",
        "wall_s",
        "time_saved_%",
    )
    rows = [
        {
            "method": k,
            "test_acc": v["test_acc"],
            "val_acc": v["val_acc"],
            "epochs_used": v["epochs_used"],
            "budget_saved_%": round(100 * v["budget_saved"], 1),
            "wall_s": f"{v['wall_s']:.1f}",
            "time_saved_%": "-" if v["time_saved"] is None else f"{100 * v['time_saved']:.1f}",
        }
        for k, v in methods.items()
    ]
    print(format_table(rows, columns))


def _round(v: Any) -> Any:
    return {k: _round(x) for k, x in v.items()} if isinstance(v, dict) else round(v, 4)


def _modes(cfg: RunConfig) -> tuple[str, ...]:
    return ("t", "v") if cfg.mode == "both" else (cfg.mode,)


def _accs(m: dict[str, Any]) -> dict[str, float]:
    keys = ("test_acc", "val_acc", "hold_acc")
    return {k: m[k] for k in keys if m.get(k) is not None}


def _driver_loaders(splits: Any, cfg: RunConfig) -> dict[str, Any]:
    """The driver's baselines' loaders: ``bn`` (train, BN re-estimation), ``val`` (selection),
    ``test``; with ``twa.hold_frac`` also ``hold`` and ``fit``, the parts of val the saved model
    is chosen on and TWA-v fits on (:func:`~twa_ray.core.start.split_held_out`, as the workers)."""
    from twa_ray.core.start import split_held_out

    sets = {"bn": splits.train, "val": splits.val, "test": splits.test}
    if cfg.twa.hold_frac:
        sets["fit"], sets["hold"] = split_held_out(splits.val, cfg.twa.hold_frac, cfg.data.seed)
    return {k: make_loader(ds, BN_BATCH, shuffle=False) for k, ds in sets.items()}


def _hold_acc(
    model: torch.nn.Module, state: dict[str, torch.Tensor], loaders: dict[str, Any]
) -> dict[str, float]:
    """``{"hold_acc": ...}`` of ``state`` (BN statistics as they are), or {} without a hold."""
    if "hold" not in loaders:
        return {}
    model.load_state_dict(state)
    return {"hold_acc": evaluate(model, loaders["hold"]).acc}


def _ema(
    sampled: SamplingResult, model: torch.nn.Module, loaders: dict[str, Any]
) -> dict[str, Any] | None:
    """The sampling run's moving average whose decay scores best on the ``fit`` part of val
    (all of val without a hold part: the hold stays untouched by every method's choices), BN
    re-estimated on train for each; leaves ``model`` at it. None when the run kept none."""
    from twa_ray.core.bn import update_bn

    splits = [s for s in ("val", "test", "fit", "hold") if s in loaders]
    scores: dict[float, dict[str, float]] = {}
    emas = sampled.read_ema()
    for decay, params in emas.items():
        model.load_state_dict(params, strict=False)  # the parameters; BN statistics re-estimated
        update_bn(loaders["bn"], model)
        scores[decay] = {f"{s}_acc": evaluate(model, loaders[s]).acc for s in splits}
    if not scores:
        return None
    chosen_on = "fit" if "fit" in loaders else "val"
    decay = max(scores, key=lambda d: scores[d][f"{chosen_on}_acc"])  # first on a tie; never test
    model.load_state_dict(emas[decay], strict=False)
    update_bn(loaders["bn"], model)
    by = {f"{s}_acc_by_decay": {str(d): a[f"{s}_acc"] for d, a in scores.items()} for s in splits}
    return {**_accs(scores[decay]), "decay": decay, "decay_chosen_on": chosen_on, **by}


def _greedy_soup(
    store: CandidateStore,
    names: list[str],
    model: torch.nn.Module,
    layout: Layout,
    loaders: dict[str, Any],
) -> dict[str, Any]:
    """Greedy soup on the driver: ranked and accepted on val, BN re-estimated on train."""
    bn, val, test = loaders["bn"], loaders["val"], loaders["test"]
    res = greedy_soup(
        lambda i: store.read(names[i]),
        len(names),
        make_scorer(model, layout, bn_loader=bn, eval_loader=val),
    )
    load_flat_(model, res.theta, layout)
    from twa_ray.core.bn import update_bn

    update_bn(bn, model)
    return {
        "test_acc": evaluate(model, test).acc,
        "val_acc": res.score,
        "kept": [names[i] for i in res.kept],
    }

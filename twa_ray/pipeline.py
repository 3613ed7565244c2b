"""One end-to-end run on Ray: ``twa-ray run``.

    sampling (Ray Train, sample_frac * E epochs) -> candidate store (pyarrow)
      -> subspace shards (object store) -> TWA-t / TWA-v (coefficient worker group)
      -> baselines (SGD at the stop, SWA, greedy soup) -> metrics.json, model, plots

The epoch budget counts every epoch of SGD plus the TWA epochs; the saving is
``1 - epochs_used / E``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from typing import Any

import torch

from twa_ray import outdir
from twa_ray.average import make_loader, write_outputs
from twa_ray.config import RunConfig, SamplingConfig
from twa_ray.core.baselines import greedy_soup
from twa_ray.core.evaluate import evaluate, make_scorer
from twa_ray.core.layout import Layout, load_flat_
from twa_ray.data import load_dataset
from twa_ray.models import build_model
from twa_ray.report import format_summary, format_table, plot_accuracy, prepare_out_dir
from twa_ray.storage import Storage, check_multi_node, open_storage
from twa_ray.store import CandidateStore

log = logging.getLogger("twa_ray")

__all__ = ["run_pipeline", "init_ray", "check_resources"]

RUN_FILE = "run.json"


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` (a cluster, or inside ``ray job submit``), or
    start a local Ray when neither is set."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=True, configure_logging=False)


def _flag(storage: Storage, given: str | None) -> str:
    return f"--storage {storage.uri!r}" if given else f"--out {storage.uri!r}"


def _check_out_dir(
    storage: Storage, *, resume: bool, overwrite: bool, marker: str = RUN_FILE, kind: str = "run",
    given: str | None = None,
) -> None:  # fmt: skip
    """Refuse the storage (``--storage``, default ``--out``) before anything starts: it holds a
    ``kind`` and neither ``--resume`` nor ``--overwrite`` was given, or ``--resume`` finds
    nothing to resume. Changes nothing."""
    exists = storage.exists(marker)
    if exists and not (resume or overwrite):
        raise FileExistsError(
            f"{_flag(storage, given)} already holds a {kind}; pass --resume to continue it or "
            "--overwrite to delete it and start over"
        )
    if resume and not exists:
        raise FileNotFoundError(f"--resume: no {kind} to resume in {_flag(storage, given)}; drop --resume")


def _claim_out_dir(
    storage: Storage, *, resume: bool, overwrite: bool, marker: str = RUN_FILE, kind: str = "run",
    given: str | None = None,
) -> str:  # fmt: skip
    """The id of the ``kind`` in ``storage`` (recorded in ``storage/marker``): new, resumed
    (``--resume``) or after deleting everything there (``--overwrite``)."""
    _check_out_dir(storage, resume=resume, overwrite=overwrite, marker=marker, kind=kind, given=given)
    if storage.exists(marker):
        if not overwrite:  # --resume
            return str(storage.read_json(marker)["run_id"])
        storage.fs.delete_dir_contents(storage.path)
    run_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage.write_json(marker, {"run_id": run_id})
    return run_id


def storage_of(cfg: RunConfig, out: str) -> tuple[Storage, dict[str, str]]:
    """The run's storage (``--storage``, default ``--out``) and the local paths among the
    locations every node reads (for :func:`twa_ray.storage.check_multi_node`)."""
    storage = open_storage(cfg.storage or out)
    paths = {("--storage" if cfg.storage else "--out (the default --storage)"): storage.uri}
    if cfg.store:
        paths["--store"] = cfg.store
    return storage, paths


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


def run_pipeline(
    cfg: RunConfig,
    *,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sample, average, evaluate and report; returns the metrics written to ``metrics.json``."""
    from twa_ray.ray.coeff_group import CoeffGroupConfig, run_twa
    from twa_ray.ray.group import check_data_root_on_nodes
    from twa_ray.ray.sampling import run_sampling
    from twa_ray.ray.shards import put_subspace

    start = time.time()
    out = prepare_out_dir(cfg.out).resolve()
    # --resume with --storage works from the storage alone: a new (empty) --out is fine
    resume_out = resume and (not cfg.storage or outdir.owner(out) is not None)
    outdir.check(out, "run", resume=resume_out, overwrite=overwrite)  # owned, not locked by another
    storage, shared_paths = storage_of(cfg, str(out))
    _check_out_dir(storage, resume=resume, overwrite=overwrite, given=cfg.storage)  # refuse early
    # workers may run in another directory: every local path they see is absolute
    cfg = dataclasses.replace(
        cfg,
        out=str(out),
        store=_ensure_abs(cfg.store) if cfg.store else storage.join("candidates"),
        data=dataclasses.replace(cfg.data, data_root=_ensure_abs(cfg.data.data_root) if cfg.data.data_root else None),
    )
    work = storage.join("work")
    s = cfg.sampling
    budget = s.epochs
    # the data and the model on the driver first: a missing dataset root or a bad model name is
    # one clear error here, not a failure inside every Ray Train worker
    splits = load_dataset(
        cfg.data.dataset, root=cfg.data.data_root, val_frac=cfg.data.val_frac,
        seed=cfg.data.seed, num_samples=cfg.data.num_samples,
    )  # fmt: skip
    model = build_model(cfg.data.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
    layout = Layout.from_module(model)
    local = address is None and not os.environ.get("RAY_ADDRESS")
    init_ray(address)
    check_resources(s, fixed=local)
    check_multi_node(shared_paths, shared_fs=cfg.shared_fs)
    check_data_root_on_nodes(cfg.data)
    outdir.lock(out)  # one writer at a time
    run_id = _claim_out_dir(storage, resume=resume, overwrite=overwrite, given=cfg.storage)
    outdir.mark(out, "run", run_id)  # when --storage is elsewhere, --out is marked too

    # -- sampling: sample_frac * E epochs of the full-budget schedule ------------------------
    log.info("sampling: %d of %d epochs on %d workers, run %s", s.sample_epochs, budget, s.num_workers, run_id)
    sampled = run_sampling(cfg.data, s, store_uri=cfg.store_uri, run_dir=work, run_id=run_id)
    store = CandidateStore(cfg.store_uri)
    log.info("sampling done: %d candidates in %.0f s", len(sampled.candidates), sampled.wall_time_s)

    # -- subspace shards in the object store, then the coefficient worker group ---------------
    names = [n for n in store.names() if store.info(n).run_id == run_id]
    sharded = put_subspace(store, layout, cfg.twa)
    modes = ("t", "v") if cfg.mode == "both" else (cfg.mode,)
    log.info("TWA-%s on %d candidates: %s", "/".join(modes), len(names), format_summary(sharded.summary()))
    results = run_twa(sharded, cfg.data, cfg.twa, CoeffGroupConfig.of_sampling(s, modes), run_dir=work, run_id=run_id)

    # -- baselines and the table -------------------------------------------------------------
    twa_epochs = cfg.twa.epochs
    last = sampled.history[-1]
    first = next(iter(results.values()))
    methods: dict[str, dict[str, Any]] = {
        "sgd_sampled": {"test_acc": last["test_acc"], "val_acc": last["val_acc"], "epochs_used": s.sample_epochs},
    }
    if first.swa is not None:
        methods["swa"] = {**_accs(first.swa), "epochs_used": s.sample_epochs}
    if cfg.greedy_soup:
        methods["greedy_soup"] = {**_greedy_soup(store, names, model, layout, splits), "epochs_used": s.sample_epochs}
    for mode, res in results.items():
        methods[f"twa_{mode}"] = {
            "test_acc": res.test_acc, "val_acc": res.val_acc, "epochs_used": s.sample_epochs + twa_epochs,
            "bytes_allreduced_per_step": res.bytes_allreduced_per_step, "alpha_identical": res.alpha_identical,
            "steps": res.steps,
        }  # fmt: skip
    full_history = None
    if cfg.compare_full:
        full = run_sampling(
            cfg.data, dataclasses.replace(s, sample_frac=1.0, sample_interval=budget),
            store_uri=storage.join("full_candidates"), run_dir=work, run_id=f"{run_id}-full",
        )  # fmt: skip
        full_history = full.history
        methods["sgd_full"] = {"test_acc": full.history[-1]["test_acc"], "val_acc": full.history[-1]["val_acc"], "epochs_used": budget}
    for m in methods.values():
        m["budget_saved"] = 1.0 - m["epochs_used"] / budget

    # the model written out: TWA-v when it ran (the paper's better variant), else TWA-t
    best_mode = "v" if "v" in results else "t"
    results[best_mode].load_into_(model, sharded)
    epochs_used = s.sample_epochs + twa_epochs
    metrics = {
        "run_id": run_id,
        "methods": methods,
        "best": f"twa_{best_mode}",
        "budget_epochs": budget,
        "epochs_used": epochs_used,
        "budget_saved": 1.0 - epochs_used / budget,
        "num_candidates": len(names),
        "numel": layout.numel,
        "subspace": sharded.summary(),
        "bytes_allreduced_per_step": first.bytes_allreduced_per_step,
        # placement of B (and why), bytes held / sent per step, the packed-kernel path of rank 0
        "coefficient_phase": first.extra,
        "sampling_history": sampled.history,
        "wall_time_s": round(time.time() - start, 1),
    }
    write_outputs(
        out, metrics=metrics, best_model=model,
        coefficients={f"twa_{m}": r.alpha for m, r in results.items()},
        block_labels=list(sharded.blocks.labels), candidate_names=names, config=cfg,
    )  # fmt: skip
    points = {k: (v["epochs_used"], v["test_acc"]) for k, v in methods.items() if k not in ("sgd_full",)}
    plot_accuracy(out / "accuracy.png", sampled.history, points, full_history=full_history)
    rows = [
        {"method": k, "test_acc": v["test_acc"], "val_acc": v["val_acc"], "epochs_used": v["epochs_used"],
         "budget_saved_%": round(100 * v["budget_saved"], 1)}
        for k, v in methods.items()
    ]  # fmt: skip
    if cfg.storage and storage.uri != str(out):  # --out is the local copy of <storage>/outputs
        storage.upload_outputs(out)
    print(format_table(rows, ("method", "test_acc", "val_acc", "epochs_used", "budget_saved_%")))
    print(f"outputs in {out} ({metrics['wall_time_s']:.0f} s)" + (f", and in {storage.join('outputs')}" if cfg.storage else ""))
    return metrics


def _accs(m: dict[str, float]) -> dict[str, float]:
    return {"test_acc": m["test_acc"], "val_acc": m["val_acc"]}


def _greedy_soup(store: CandidateStore, names: list[str], model: torch.nn.Module, layout: Layout, splits: Any) -> dict[str, Any]:
    """Greedy soup on the driver: ranked and accepted on val, BN re-estimated on train."""
    bn = make_loader(splits.train, 512, shuffle=False)
    val = make_loader(splits.val, 512, shuffle=False)
    test = make_loader(splits.test, 512, shuffle=False)
    res = greedy_soup(lambda i: store.read(names[i]), len(names), make_scorer(model, layout, bn_loader=bn, eval_loader=val))
    load_flat_(model, res.theta, layout)
    from twa_ray.core.bn import update_bn

    update_bn(bn, model)
    return {"test_acc": evaluate(model, test).acc, "val_acc": res.score, "kept": [names[i] for i in res.kept]}


def _ensure_abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)

"""TWA on an existing candidate store, in one process (no Ray): ``twa-ray average``.

    store (or a folder of checkpoints) -> SWA, greedy soup -> TWA-t / TWA-v -> outputs

Its outputs are those of ``twa-ray run`` (:func:`twa_ray.report.write_outputs`), in a folder
claimed the same way (:func:`twa_ray.outdir.claimed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from twa_ray import outdir
from twa_ray.config import RunConfig
from twa_ray.core.baselines import greedy_soup, uniform_average
from twa_ray.core.bn import update_bn
from twa_ray.core.evaluate import BN_BATCH, evaluate, make_scorer
from twa_ray.core.host import build_loop, standard_evaluation
from twa_ray.core.kernels.cpu import kernel_info
from twa_ray.core.layout import Layout, load_flat_
from twa_ray.core.loop import LoopHooks
from twa_ray.core.start import run_chosen, split_held_out
from twa_ray.core.subspace import Subspace
from twa_ray.core.twa import TWA, TWAConfig, build_subspace
from twa_ray.data import DataSplits, load_data
from twa_ray.data.loaders import make_loader
from twa_ray.models import build_model
from twa_ray.report import (
    best_method,
    check_finite,
    choose_saved,
    format_summary,
    format_table,
    write_json,
    write_outputs,
)
from twa_ray.storage import join_uri
from twa_ray.store import CandidateStore, import_checkpoints, tied_names
from twa_ray.store.hf import HFLogits, save_folder
from twa_ray.store.importers import find_checkpoints

log = logging.getLogger("twa_ray")

__all__ = [
    "run_average",
    "open_candidates",
    "InModelOrder",
    "checkpoint_sources",
    "Baselines",
    "compute_baselines",
    "fit_twa",
    "make_loaders",
]


IMPORT_FILE = "import.json"  # what out/candidates was imported from (names, sizes, digests)


def checkpoint_sources(src: str | Path) -> dict[str, Any]:
    """The identity of a checkpoint folder: each checkpoint's name, size and BLAKE2b digest."""
    files = []
    for name, path in find_checkpoints(src):
        h = hashlib.blake2b(digest_size=16)
        parts = (
            sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        )  # HF folders
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        files.append(
            {
                "name": name,
                "file": str(path.relative_to(src)) if path != Path(src) else path.name,
                "size": sum(p.stat().st_size for p in parts),
                "blake2b": h.hexdigest(),
            }
        )
    return {"source": str(Path(src).resolve()), "files": files}


def open_candidates(
    src: str, out: Path, layout: Layout, aliases: dict[str, tuple[str, ...]] | None = None
) -> CandidateStore | InModelOrder:
    """A candidate store at ``src``; a folder of ``.pt`` / ``.safetensors`` checkpoints is
    imported into ``out/candidates`` first, reused only when ``out/import.json`` records the
    same checkpoints (names, sizes, digests), otherwise imported again."""
    path = Path(src)
    if "://" not in src and path.is_dir() and not any(path.glob("*.arrow")):
        dest = out / "candidates"
        sources = checkpoint_sources(path)
        record = out / IMPORT_FILE
        try:
            same = json.loads(record.read_text()) == sources and any(dest.glob("*.arrow"))
        except (OSError, ValueError):
            same = False
        if not same:
            record.unlink(missing_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            log.info("importing checkpoints from %s into %s", src, dest)
            log.info(
                "%s",
                import_checkpoints(src, str(dest), layout=layout, aliases=aliases).summary(
                    str(dest)
                ),
            )
            write_json(record, sources)
        else:
            log.info("reusing the candidates imported from %s (same checkpoints)", src)
        src = str(dest)
    store = CandidateStore(src)
    if len(store) == 0:
        raise ValueError(
            f"candidate store {src!r} is empty; run the sampling phase or import checkpoints"
        )
    assert store.layout is not None
    if _same_tensors(store.layout, layout):
        return InModelOrder(store, layout)
    layout.check_compatible(store.layout, f"candidate store {src!r}")
    return store


def _same_tensors(stored: Layout, model: Layout) -> bool:
    """The same named tensors (shapes, dtypes) in another order."""
    return stored.fingerprint != model.fingerprint and sorted(
        zip(stored.names, stored.shapes, stored.dtypes)
    ) == sorted(zip(model.names, model.shapes, model.dtypes))


class InModelOrder:
    """A store whose candidates hold the model's tensors in another order (``.safetensors``
    imported without ``--model`` keep their file's alphabetical order), read in the model's
    order: tensors are matched by name, one copy per read."""

    def __init__(self, store: CandidateStore, layout: Layout) -> None:
        stored = store.layout
        assert stored is not None
        at = {n: (stored.offsets[i], stored.offsets[i + 1]) for i, n in enumerate(stored.names)}
        self.store, self.layout, self._spans = store, layout, [at[n] for n in layout.names]

    def names(self) -> list[str]:
        return self.store.names()

    def __len__(self) -> int:
        return len(self.store)

    def read(self, name: str) -> torch.Tensor:
        flat = self.store.read(name)
        return torch.cat([flat[a:b] for a, b in self._spans])

    def iter_flat(self, names: list[str] | None = None) -> Any:
        for name in self.names() if names is None else names:
            yield self.read(name)


@dataclass
class Baselines:
    """SWA and greedy soup on the same candidates (BN re-estimated on train data)."""

    swa: dict[str, float] = field(default_factory=dict)
    greedy_soup: dict[str, Any] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


EVAL_SPLITS = ("val", "test", "hold")
"""The evaluated splits (``hold``: the part of val held out of TWA-v's fit, when there is one)."""


def _accuracies(
    model: nn.Module, layout: Layout, theta: torch.Tensor, loaders: dict[str, DataLoader[Any]]
) -> dict[str, float]:
    load_flat_(model, theta, layout)
    update_bn(loaders["bn"], model, device=_device(model))
    return {
        f"{s}_acc": evaluate(model, loaders[s], device=_device(model)).acc
        for s in EVAL_SPLITS
        if s in loaders
    }


def compute_baselines(
    store: CandidateStore | InModelOrder,
    model: nn.Module,
    loaders: dict[str, DataLoader[Any]],
    *,
    soup: bool = True,
    names: Sequence[str] | None = None,
) -> Baselines:
    """Accuracy of the last candidate, SWA and (optionally) the greedy soup, ranked on val,
    over ``names`` (default: every candidate in the store)."""
    layout = Layout.from_module(model)
    names = list(store.names() if names is None else names)
    out = Baselines()
    out.last = _accuracies(model, layout, store.read(names[-1]).clone(), loaders)
    out.swa = _accuracies(model, layout, uniform_average(store.read(n) for n in names), loaders)
    if soup:
        score = make_scorer(
            model,
            layout,
            bn_loader=loaders["bn"],
            eval_loader=loaders["val"],
            device=_device(model),
        )
        res = greedy_soup(lambda i: store.read(names[i]), len(names), score)
        out.greedy_soup = _accuracies(model, layout, res.theta, loaders)
        out.greedy_soup["kept"] = [names[i] for i in res.kept]
    return out


def make_loaders(
    splits: DataSplits,
    batch_size: int,
    seed: int,
    *,
    pin_memory: bool = False,
    hold_frac: float = 0.0,
) -> dict[str, DataLoader[Any]]:
    """``train`` / ``val_train`` (shuffled, for TWA-t / TWA-v), ``bn`` (train, for BatchNorm
    re-estimation), ``val`` and ``test`` (evaluation); with ``hold_frac > 0`` also ``hold``
    (:func:`~twa_ray.core.start.split_held_out`), which ``val_train`` then leaves out."""
    pin = {"pin_memory": pin_memory}
    fit, hold = split_held_out(splits.val, hold_frac, seed) if hold_frac else (splits.val, None)
    loaders = {
        "train": make_loader(splits.train, batch_size, shuffle=True, seed=seed, **pin),
        "val_train": make_loader(fit, batch_size, shuffle=True, seed=seed, **pin),
        "bn": make_loader(splits.train, BN_BATCH, shuffle=False, **pin),
        "val": make_loader(splits.val, BN_BATCH, shuffle=False, **pin),
        "test": make_loader(splits.test, BN_BATCH, shuffle=False, **pin),
    }
    if hold is not None:
        loaders["hold"] = make_loader(hold, BN_BATCH, shuffle=False, **pin)
    return loaders


def fit_twa(
    model: nn.Module,
    subspace: Subspace,
    config: TWAConfig,
    loaders: dict[str, DataLoader[Any]],
    mode: str,
    *,
    seed: int = 0,
    named: dict[str, Any] | None = None,
) -> tuple[TWA, dict[str, Any]]:
    """TWA-t (``mode='t'``, train batches) or TWA-v (``'v'``, held-out batches) with the core
    loop (:func:`~twa_ray.core.host.build_loop`), started and kept as ``config.start`` /
    ``keep_best`` say (:func:`~twa_ray.core.start.run_chosen`, scored on ``loaders["hold"]``,
    else val; ``named``: the candidate rows of the start points, default ``{"last": -1}``),
    BatchNorm re-estimated on train data; returns the engine, its accuracies and choices.

    The loop reads the datasets and batch size of ``loaders["train"]`` / ``["val_train"]`` in
    its own seeded order (``seed``), as every host does.
    """
    train, val = loaders["train"], loaders["val_train"]
    assert train.batch_size is not None
    splits = [s for s in EVAL_SPLITS if s in loaders]
    evaluation = standard_evaluation(loaders["bn"], {s: loaders[s] for s in splits})
    twa = TWA(model, subspace, config=config)
    loop = build_loop(
        twa,
        mode,
        train.dataset,
        val.dataset,
        batch_size=train.batch_size,
        seed=seed,
        loader_options={"pin_memory": train.pin_memory},
        hooks=LoopHooks(evaluate=evaluation),
    )
    metric = "hold_acc" if "hold" in loaders else "val_acc"
    info = run_chosen(loop, named or {"last": -1}, metric)
    return twa, {**{f"{s}_acc": loop.final[f"{s}_acc"] for s in splits}, **info}


@dataclass(frozen=True)
class _Averaged:
    """What :func:`run_average` writes: the metrics (``wall_time_s`` aside), each variant's
    coefficients, the block labels and the candidates' names."""

    metrics: dict[str, Any]
    coefficients: dict[str, torch.Tensor]
    block_labels: list[str]
    names: list[str]


def run_average(
    cfg: RunConfig, *, batch_size: int = 128, req: outdir.Request | None = None
) -> dict[str, Any]:
    """Baselines and TWA on ``cfg.store`` with the model and data of ``cfg.data``; writes the
    outputs to ``cfg.out`` (owned: see :mod:`twa_ray.outdir`; ``req``: how the command line
    asked, default none of --overwrite) and returns the metrics."""
    start = time.time()
    cfg = _resolve_store(cfg)
    req = req or outdir.Request("average", cfg.out, cfg.storage)
    req = dataclasses.replace(
        req,
        inputs=(("--store", cfg.store), ("--data-root", cfg.data.data_root)),
        keep=("candidates", IMPORT_FILE),
    )
    with outdir.claimed(req) as outputs:
        torch.manual_seed(cfg.data.seed)
        splits, model, layout, device = _setup_model(cfg)
        outputs.claim()
        assert outputs.out is not None
        res = _average(cfg, outputs.out, splits, model, layout, device, batch_size=batch_size)
        metrics = {**res.metrics, "wall_time_s": round(time.time() - start, 2)}
        check_finite(model, res.coefficients)  # NaN/Inf: nothing is written
        outputs.keep()  # results from here on: a failure below leaves what was written
        write_outputs(
            outputs.out,
            metrics=metrics,
            best_model=model,
            coefficients=res.coefficients,
            block_labels=res.block_labels,
            candidate_names=res.names,
            config=cfg,
        )
        if isinstance(model, HFLogits):  # --model hf:FOLDER: also a folder from_pretrained loads
            save_folder(model, outputs.out / "hf_model")
        outputs.publish("average")  # --out is the local copy of <storage>/average
    rows = [{"method": k, **v} for k, v in metrics["methods"].items()]
    print(format_table(rows, ("method", "test_acc", "val_acc")))
    print(f"outputs in {outputs.out} ({metrics['wall_time_s']:.0f} s)")
    return metrics


def _average(
    cfg: RunConfig,
    out: Path,
    splits: DataSplits,
    model: nn.Module,
    layout: Layout,
    device: torch.device,
    *,
    batch_size: int,
) -> _Averaged:
    """The baselines and TWA-t / TWA-v on the candidates of ``cfg.store``."""
    store = open_candidates(cfg.store, out, layout, tied_names(model))  # type: ignore[arg-type]
    names = store.names()
    loaders = make_loaders(
        splits,
        batch_size,
        cfg.data.seed,
        pin_memory=device.type == "cuda",
        hold_frac=cfg.twa.hold_frac,
    )
    log.info("%d candidates, D=%d; baselines ...", len(names), layout.numel)
    methods, named, thetas = _free_averages(cfg, store, names, model, loaders)
    _check_range(store, names)
    subspace = build_subspace(store, layout, cfg.twa)
    summary: dict[str, Any] = {
        "kind": subspace.kind,
        "bits": cfg.twa.bits,
        "num_rows": subspace.num_rows,
        "num_blocks": subspace.num_blocks,
        "numel": layout.numel,
        "num_candidates": len(names),
        "dropped": list(subspace.dropped),
        "quant_error_max": float(subspace.quant_error.max()),
    }
    log.info("subspace: %s", format_summary(summary))
    kernel = kernel_info() if device.type == "cpu" else {"path": "cuda"}
    log.debug(
        "coefficient kernel: %s path (%s), %s threads, %s",
        kernel["path"],
        kernel.get("chosen_by", "device"),
        kernel.get("threads", "-"),
        kernel.get("cpu", cfg.device),
    )
    coefficients, saved, reason = _fit_modes(cfg, model, subspace, loaders, methods, named)
    if saved in thetas:  # a free average: its weights, BN re-estimated
        _accuracies(model, layout, thetas[saved](), {"bn": loaders["bn"]})
    metrics = {
        "methods": methods,
        **best_method(methods, saved_model=saved, saved_reason=reason),
        "data": splits.summary(),
        "num_candidates": len(names),
        "numel": layout.numel,
        "subspace": {**summary, "rows": subspace.num_rows, "blocks": subspace.num_blocks},
        "kernel": kernel,
    }
    return _Averaged(metrics, coefficients, list(subspace.blocks.labels), names)


def _free_averages(
    cfg: RunConfig,
    store: CandidateStore | InModelOrder,
    names: list[str],
    model: nn.Module,
    loaders: dict[str, DataLoader[Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Callable[[], torch.Tensor]]]:
    """The baselines (an EMA candidate a run wrote with ``source="ema"`` is one of them, not a
    sampled iterate: SWA and the last candidate leave it out), the start points' candidate rows
    (:func:`~twa_ray.core.start.start_points`) and each savable average's weights."""
    layout = Layout.from_module(model)
    extra = ema_names(store, names)
    sampled = [n for n in names if n not in extra]
    base = compute_baselines(store, model, loaders, soup=cfg.greedy_soup, names=sampled)
    methods: dict[str, dict[str, Any]] = {"last_candidate": base.last, "swa": base.swa}
    if base.greedy_soup:
        methods["greedy_soup"] = base.greedy_soup
    named: dict[str, Any] = {"last": names.index(sampled[-1])}
    thetas = {
        "swa": lambda: uniform_average(store.read(n) for n in sampled),
        "last_candidate": lambda: store.read(sampled[-1]).clone(),
    }
    if extra:
        methods["ema"] = _accuracies(model, layout, store.read(extra[-1]).clone(), loaders)
        named.update(swa=[names.index(n) for n in sampled], ema=names.index(extra[-1]))
        thetas["ema"] = lambda: store.read(extra[-1]).clone()
    return methods, named, thetas


def _resolve_store(cfg: RunConfig) -> RunConfig:
    """The config with its store resolved: ``--store``, or the candidates of a run in
    ``--storage``."""
    if cfg.store is None and cfg.storage:
        cfg = dataclasses.replace(cfg, store=join_uri(cfg.storage, "candidates"))
    if cfg.store is None:
        raise ValueError(
            "twa-ray average needs --store (a candidate store or a folder of checkpoints)"
        )
    return cfg


def _setup_model(cfg: RunConfig) -> tuple[DataSplits, nn.Module, Layout, torch.device]:
    """The dataset and the model on ``cfg.device`` (TWA places B on the model's device, once)."""
    splits = load_data(cfg.data)
    model = build_model(
        cfg.data.model, num_classes=splits.num_classes, input_shape=splits.input_shape
    )
    layout = Layout.from_module(model)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no usable CUDA device; use --device cpu")
    model.to(device)
    return splits, model, layout, device


def _check_range(store: CandidateStore | InModelOrder, names: Sequence[str]) -> None:
    """Refuse candidates whose differences from their mean overflow float32."""
    peak = max(float(store.read(n).abs().max()) for n in names)
    if peak > torch.finfo(torch.float32).max / 2:  # |candidate - mean| <= 2 peak must fit float32
        raise ValueError(
            f"the candidates hold values up to {peak:.3g}: their differences from the mean overflow "
            "float32 (diverged training?); drop those checkpoints (nothing was written)"
        )


def ema_names(store: Any, names: Sequence[str]) -> list[str]:
    """The candidates a run wrote with ``source="ema"`` (the sampling run's EMA)."""
    inner = getattr(store, "store", store)
    info = getattr(inner, "info", None)
    return [n for n in names if info is not None and info(n).source == "ema"]


def _fit_modes(
    cfg: RunConfig,
    model: nn.Module,
    subspace: Subspace,
    loaders: dict[str, DataLoader[Any]],
    methods: dict[str, dict[str, Any]],
    named: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], str, str]:
    """TWA-t and/or TWA-v (their accuracies into ``methods``); the saved method
    (:func:`~twa_ray.report.choose_saved`: ``--save``, else the best on the hold split); leaves
    the model at it when it is a TWA variant; returns the coefficients, its name and why."""
    coefficients: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for mode in ("t", "v") if cfg.mode == "both" else (cfg.mode,):
        name = f"twa_{mode}"
        twa, methods[name] = fit_twa(
            model, subspace, cfg.twa, loaders, mode, seed=cfg.data.seed, named=named
        )
        coefficients[name] = twa.alpha.detach().cpu().clone()
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
    saved, reason = choose_saved(methods, save=cfg.save)
    if saved in states:
        model.load_state_dict(states[saved])
    return coefficients, saved, reason

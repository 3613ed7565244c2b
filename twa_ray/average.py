"""TWA on an existing candidate store, in one process (no Ray): ``twa-ray average``.

    store (or a folder of checkpoints) -> SWA, greedy soup -> TWA-t / TWA-v -> outputs

The same baseline and output code serves the distributed pipeline (:mod:`twa_ray.pipeline`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twa_ray.config import RunConfig
from twa_ray.core.baselines import greedy_soup, uniform_average
from twa_ray.core.bn import update_bn
from twa_ray.core.evaluate import evaluate, make_scorer
from twa_ray.core.layout import Layout, load_flat_
from twa_ray.core.subspace import Subspace
from twa_ray.core.twa import TWA, TWAConfig, build_subspace
from twa_ray.data import DataSplits, load_dataset
from twa_ray.models import build_model
from twa_ray.report import (
    format_table,
    plot_coefficients,
    prepare_out_dir,
    write_coefficients,
    write_json,
    write_model,
)
from twa_ray.store import CandidateStore, import_checkpoints

log = logging.getLogger("twa_ray")

__all__ = [
    "run_average", "open_candidates", "Baselines", "compute_baselines", "fit_twa", "make_loader", "make_loaders",
    "write_outputs",
]

METHOD_COLUMNS = ("method", "test_acc", "val_acc", "epochs_used", "budget_saved_%")


def make_loader(ds: Dataset[Any], batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None)


def open_candidates(src: str, out: Path, layout: Layout) -> CandidateStore:
    """A candidate store at ``src``; a folder of ``.pt`` / ``.safetensors`` checkpoints is
    imported into ``out/candidates`` first."""
    path = Path(src)
    if "://" not in src and path.is_dir() and not any(path.glob("*.arrow")):
        dest = out / "candidates"
        if not (dest.is_dir() and any(dest.glob("*.arrow"))):
            log.info("importing checkpoints from %s into %s", src, dest)
            import_checkpoints(src, str(dest), layout=layout)
        src = str(dest)
    store = CandidateStore(src)
    if len(store) == 0:
        raise ValueError(f"candidate store {src!r} is empty; run the sampling phase or import checkpoints")
    assert store.layout is not None
    layout.check_compatible(store.layout, f"candidate store {src!r}")
    return store


@dataclass
class Baselines:
    """SWA and greedy soup on the same candidates (BN re-estimated on train data)."""

    swa: dict[str, float] = field(default_factory=dict)
    greedy_soup: dict[str, Any] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)


def _accuracies(model: nn.Module, layout: Layout, theta: torch.Tensor, loaders: dict[str, DataLoader[Any]]) -> dict[str, float]:
    load_flat_(model, theta, layout)
    update_bn(loaders["bn"], model)
    return {f"{s}_acc": evaluate(model, loaders[s]).acc for s in ("val", "test")}


def compute_baselines(
    store: CandidateStore,
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
        score = make_scorer(model, layout, bn_loader=loaders["bn"], eval_loader=loaders["val"])
        res = greedy_soup(lambda i: store.read(names[i]), len(names), score)
        out.greedy_soup = _accuracies(model, layout, res.theta, loaders)
        out.greedy_soup["kept"] = [names[i] for i in res.kept]
    return out


def write_outputs(
    out: Path,
    *,
    metrics: dict[str, Any],
    best_model: nn.Module | None,
    coefficients: dict[str, torch.Tensor],
    block_labels: list[str],
    candidate_names: list[str],
    config: RunConfig,
) -> None:
    """metrics.json, model.safetensors, coefficients.parquet, config.yaml and the heatmaps."""
    import yaml

    write_json(out / "metrics.json", metrics)
    with open(out / "config.yaml.tmp", "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    (out / "config.yaml.tmp").replace(out / "config.yaml")
    if best_model is not None:
        write_model(out / "model.safetensors", best_model, {"format": "pt", "source": "twa_ray"})
    if coefficients:
        write_coefficients(
            out / "coefficients.parquet", coefficients, block_labels=block_labels, candidate_names=candidate_names
        )
        for variant, alpha in coefficients.items():
            plot_coefficients(
                out / f"coefficients_{variant}.png", alpha, block_labels=block_labels, title=f"{variant} coefficients"
            )


def make_loaders(splits: DataSplits, batch_size: int, seed: int) -> dict[str, DataLoader[Any]]:
    """``train`` / ``val_train`` (shuffled, for TWA-t / TWA-v), ``bn`` (train, for BatchNorm
    re-estimation), ``val`` and ``test`` (evaluation)."""
    return {
        "train": make_loader(splits.train, batch_size, shuffle=True, seed=seed),
        "val_train": make_loader(splits.val, batch_size, shuffle=True, seed=seed),
        "bn": make_loader(splits.train, 512, shuffle=False),
        "val": make_loader(splits.val, 512, shuffle=False),
        "test": make_loader(splits.test, 512, shuffle=False),
    }


def fit_twa(
    model: nn.Module, subspace: Subspace, config: TWAConfig, loaders: dict[str, DataLoader[Any]], mode: str
) -> tuple[TWA, dict[str, float]]:
    """TWA-t (``mode='t'``, train batches) or TWA-v (``'v'``, held-out batches) from the SWA
    point, BatchNorm re-estimated on train data; returns the engine and its accuracies.

    TWA-v takes as many steps as TWA-t (``config.epochs`` passes over the train split),
    cycling the smaller held-out split.
    """
    twa = TWA(model, subspace, config=config)
    steps = max(1, round(config.epochs * len(loaders["train"])))
    twa.fit(loaders["train" if mode == "t" else "val_train"], steps=steps)
    twa.update_bn(loaders["bn"])
    return twa, {f"{s}_acc": evaluate(model, loaders[s]).acc for s in ("val", "test")}


def run_average(cfg: RunConfig, *, batch_size: int = 128) -> dict[str, Any]:
    """Baselines and TWA on ``cfg.store`` with the model and data of ``cfg.data``; writes the
    outputs to ``cfg.out`` and returns the metrics."""
    start = time.time()
    out = prepare_out_dir(cfg.out)
    torch.manual_seed(cfg.data.seed)
    splits = load_dataset(
        cfg.data.dataset, root=cfg.data.data_root, val_frac=cfg.data.val_frac, seed=cfg.data.seed,
        num_samples=cfg.data.num_samples,
    )
    model = build_model(cfg.data.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
    layout = Layout.from_module(model)
    if cfg.store is None:
        raise ValueError("twa-ray average needs --store (a candidate store or a folder of checkpoints)")
    store = open_candidates(cfg.store, out, layout)
    names = store.names()
    loaders = make_loaders(splits, batch_size, cfg.data.seed)
    log.info("%d candidates, D=%d; baselines ...", len(names), layout.numel)
    base = compute_baselines(store, model, loaders, soup=cfg.greedy_soup)
    methods: dict[str, dict[str, Any]] = {"last_candidate": base.last, "swa": base.swa}
    if base.greedy_soup:
        methods["greedy_soup"] = base.greedy_soup
    subspace = build_subspace(store, layout, cfg.twa)
    coefficients: dict[str, torch.Tensor] = {}
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for mode in ("t", "v") if cfg.mode == "both" else (cfg.mode,):
        name = f"twa_{mode}"
        twa, methods[name] = fit_twa(model, subspace, cfg.twa, loaders, mode)
        coefficients[name] = twa.alpha.detach().cpu().clone()
        if best is None or methods[name]["val_acc"] > best[0]:
            best = (methods[name]["val_acc"], {k: v.clone() for k, v in model.state_dict().items()})
    assert best is not None
    model.load_state_dict(best[1])
    metrics = {
        "methods": methods,
        "num_candidates": len(names),
        "numel": layout.numel,
        "subspace": {"kind": subspace.kind, "rows": subspace.num_rows, "blocks": subspace.num_blocks,
                     "dropped": list(subspace.dropped), "quant_error_max": float(subspace.quant_error.max())},
        "wall_time_s": round(time.time() - start, 2),
    }
    write_outputs(out, metrics=metrics, best_model=model, coefficients=coefficients,
                  block_labels=list(subspace.blocks.labels), candidate_names=names, config=cfg)
    rows = [{"method": k, **v} for k, v in methods.items()]
    print(format_table(rows, ("method", "test_acc", "val_acc")))
    return metrics

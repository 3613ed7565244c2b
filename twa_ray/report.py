"""Outputs of a run: metrics.json, model.safetensors, coefficients.parquet, plots, a table.

Every file is written atomically (:func:`twa_ray.core.atomic.atomic_path`: a temporary file in
the same directory, then ``os.replace``): a crash never leaves a file that loads as valid but
holds half the data.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from twa_ray.core.atomic import atomic_path
from twa_ray.redact import redact

if TYPE_CHECKING:
    from twa_ray.config import RunConfig

__all__ = [
    "best_method",
    "check_save",
    "choose_saved",
    "write_json",
    "write_model",
    "write_coefficients",
    "format_summary",
    "format_table",
    "plot_accuracy",
    "plot_coefficients",
    "plot_sweep",
    "write_table",
    "write_outputs",
    "check_finite",
]


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(
            redact(obj), f, indent=2, sort_keys=True, default=_json_default
        )  # no credential saved
        f.write("\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def write_model(
    path: str | os.PathLike[str], model: torch.nn.Module, metadata: Mapping[str, str]
) -> None:
    """The full state dict (parameters and BN buffers) as safetensors, tied tensors once.

    ``safetensors.torch.save_model`` semantics: of the names of one tied tensor (``head.weight =
    emb.weight``) the first in sorted order is saved and each other name is recorded in the
    metadata as ``{other: kept}``; ``safetensors.torch.load_model(model, path)`` restores the tie.
    """
    from safetensors.torch import save_file

    state, meta = shared_once(model.state_dict())
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(state, tmp, metadata={**meta, **metadata})
        except (
            Exception
        ) as e:  # safetensors reports I/O errors as SafetensorError("... (os error N)")
            code = re.search(r"os error (\d+)", str(e))
            if code is not None:
                raise OSError(int(code.group(1)), f"cannot write {path}: {e}", str(path)) from None
            raise ValueError(
                f"cannot write {path} ({type(e).__name__}: {' '.join(str(e).split())[:160]}...); the "
                f"model's tensors overlap in a way safetensors cannot store (views of one "
                f"another); the other outputs in {Path(path).parent} are kept"
            ) from None


def shared_once(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` with each tensor that several names share (same storage, offset, shape,
    strides) kept under its first name in sorted order, and ``{dropped name: kept name}``."""
    kept: dict[tuple[Any, ...], str] = {}
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    for name in sorted(state):
        t = state[name]
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if t.numel() and key in kept:
            dropped[name] = kept[key]
        else:
            kept.setdefault(key, name)
            out[name] = t
    return {k: out[k] for k in state if k in out}, dropped


def best_method(
    methods: Mapping[str, Mapping[str, Any]], saved_model: str, saved_reason: str = ""
) -> dict[str, str]:
    """The ``metrics.json`` keys naming the winner: ``best``, the method of highest validation
    accuracy (``best_split: "val"``; the first on a tie; test accuracy is never used to select),
    and ``saved_model``, the method written to ``model.safetensors`` (``saved_reason``: why)."""
    scored = [(name, m["val_acc"]) for name, m in methods.items() if m.get("val_acc") is not None]
    best = max(scored, key=lambda nm: nm[1])[0] if scored else saved_model
    out = {"best": best, "best_split": "val", "saved_model": saved_model}
    return {**out, "saved_reason": saved_reason} if saved_reason else out


SAVABLE = ("twa_v", "twa_t", "ema", "swa", "sgd_sampled", "last_candidate")
"""Methods whose weights a run can write to ``model.safetensors``, in tie order (TWA first;
``sgd_sampled`` / ``last_candidate``: the last iterate of ``run`` / ``average``)."""


SAVABLE_BY = {
    "run": ("twa_v", "twa_t", "ema", "swa", "sgd_sampled"),
    "average": ("twa_v", "twa_t", "ema", "swa", "last_candidate"),
}
"""What ``--save`` may name, by command (``ema``: with an EMA candidate in the store)."""


def check_save(save: str, command: str) -> None:
    """Refuse, before anything runs, a ``--save`` method that ``command`` never writes."""
    allowed = SAVABLE_BY[command]
    if save != "auto" and save not in allowed:
        raise ValueError(
            f"--save {save}: twa-ray {command} cannot save it; use auto or one of "
            f"{', '.join(allowed)}"
        )


def choose_saved(
    methods: Mapping[str, Mapping[str, Any]],
    *,
    save: str = "auto",
    available: Sequence[str] = SAVABLE,
) -> tuple[str, str]:
    """``(method, reason)``: the method written to ``model.safetensors``.

    ``save="auto"``: among the ``available`` methods of :data:`SAVABLE`, the highest accuracy on
    the *hold* split (the part of val that no method fitted on: TWA-v fits on the rest, see
    ``TWAConfig.hold_frac``), the first in :data:`SAVABLE` order on a tie. Without hold scores
    (``hold_frac=0``) it falls back on val, where TWA-v's own score is optimistic (it fitted
    there), and says so. Otherwise ``save`` names the method; one this run lacks is a
    ``ValueError`` naming the ones it has.
    """
    options = [m for m in SAVABLE if m in methods and m in available]
    if save != "auto":
        if save not in options:
            raise ValueError(
                f"--save {save}: this run has no {save} weights to save; "
                f"use one of {', '.join(['auto', *options])}"
            )
        return save, f"--save {save}"
    if not options:
        raise ValueError("no method with weights to save; this run produced none")
    split = "hold" if all(methods[m].get("hold_acc") is not None for m in options) else "val"
    scores = {m: float(methods[m][f"{split}_acc"]) for m in options}
    best = max(options, key=lambda m: scores[m])
    listed = ", ".join(f"{m} {100 * a:.2f}%" for m, a in scores.items())
    where = (
        "the hold part of val (no method fitted on it)"
        if split == "hold"
        else "val (TWA-v fitted on it: its score is optimistic)"
    )
    return best, f"highest accuracy on {where}: {listed}"


def write_coefficients(
    path: str | os.PathLike[str],
    coefficients: Mapping[str, torch.Tensor],
    *,
    block_labels: Sequence[str],
    candidate_names: Sequence[str] | None = None,
) -> None:
    """Long-format Parquet table: variant, candidate (row), block, block_label, alpha."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[Any]] = {
        k: [] for k in ("variant", "row", "candidate", "block", "block_label", "alpha")
    }
    for variant, alpha in coefficients.items():
        rows, blocks = alpha.shape
        for k in range(rows):
            for l in range(blocks):
                cols["variant"].append(variant)
                cols["row"].append(k)
                cols["candidate"].append(
                    candidate_names[k] if candidate_names and k < len(candidate_names) else str(k)
                )
                cols["block"].append(l)
                cols["block_label"].append(block_labels[l])
                cols["alpha"].append(float(alpha[k, l]))
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)


def format_summary(s: Mapping[str, Any]) -> str:
    """One readable line for a subspace summary (``ShardedSubspace.summary()`` or the like)."""
    bits = s.get("bits")
    parts = [
        f"{s.get('kind', '?')} subspace of {s.get('num_candidates', '?')} candidates",
        f"{s.get('num_rows', '?')} rows x {s.get('num_blocks', '?')} blocks",
        f"D={s['numel']:,}" if "numel" in s else None,
        (f"{bits}-bit basis" if bits in (1, 2, 4, 8) else "unquantized basis") if bits else None,
        f"{s['nbytes'] / 2**20:.1f} MiB in {s.get('num_shards', 1)} shard(s)"
        if "nbytes" in s
        else None,
        f"max quantization error {s['quant_error_max']:.2g}" if "quant_error_max" in s else None,
        f"dropped {len(s['dropped'])} collinear" if s.get("dropped") else None,
    ]
    return ", ".join(p for p in parts if p)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table (markdown pipes), numbers rounded for reading."""

    def fmt(v: Any) -> str:
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(list(columns)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(
    path: str | os.PathLike[str],
    history: Sequence[Mapping[str, Any]],
    points: Mapping[str, tuple[float, float]],
    *,
    full_history: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Test accuracy of SGD against epochs, with the averaged solutions marked at their cost."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if full_history:
        ax.plot(
            [h["epoch"] for h in full_history],
            [h["test_acc"] for h in full_history],
            color="0.7",
            label="SGD (full budget)",
        )
    ax.plot(
        [h["epoch"] for h in history],
        [h["test_acc"] for h in history],
        color="C0",
        label="SGD (sampling)",
    )
    markers = iter("os^Dv*P")
    for name, (epochs, acc) in points.items():
        ax.scatter([epochs], [acc], marker=next(markers, "o"), s=60, zorder=3, label=name)
    ax.set_xlabel("epochs used")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_coefficients(
    path: str | os.PathLike[str], alpha: torch.Tensor, *, block_labels: Sequence[str], title: str
) -> None:
    """Heatmap of the learned coefficients: candidates (rows) x blocks (columns)."""
    plt = _pyplot()
    rows, blocks = alpha.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * blocks, 14), min(2 + 0.25 * rows, 10)))
    lim = float(alpha.abs().max()) or 1.0
    im = ax.imshow(alpha.cpu().numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xlabel("block")
    ax.set_ylabel("candidate")
    if blocks <= 40:
        ax.set_xticks(range(blocks), [b[:18] for b in block_labels], rotation=90, fontsize=6)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_table(stem: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """``stem.parquet`` and ``stem.csv``: one row per mapping (columns in first-seen order)."""
    import pandas as pd

    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    stem = Path(stem)
    with atomic_path(stem.with_suffix(".parquet")) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        df.to_csv(tmp, index=False)


def plot_sweep(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    knobs: Sequence[str],
    *,
    metric: str = "val_acc",
    best_index: int | None = None,
) -> None:
    """``metric`` of every trial against each swept knob, one panel per knob: completed trials
    as dots, early-stopped ones as crosses (their last reported value), the best as a star.
    Numeric knobs spanning more than a decade get a log axis; the others are categories."""
    import math

    plt = _pyplot()
    knobs = list(knobs) or ["index"]
    cols = min(3, len(knobs))
    nrows = math.ceil(len(knobs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    ok = [r for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]
    for ax, knob in zip(axes.flat, knobs):
        values = [r.get(knob) for r in ok]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and values:
            xs = [float(v) for v in values]
            if min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
            if len(set(xs)) <= 8:
                ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
                ax.minorticks_off()
        else:
            cats = sorted({str(v) for v in values})
            xs = [cats.index(str(v)) for v in values]
            ax.set_xticks(range(len(cats)), cats)
        for status, marker, color in (("completed", "o", "C0"), ("stopped", "x", "0.5")):
            pts = [(x, r[metric]) for x, r in zip(xs, ok) if r.get("status") == status]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, s=28, label=status)
        best = [(x, r[metric]) for x, r in zip(xs, ok) if r.get("index") == best_index]
        if best:
            ax.scatter(*zip(*best), marker="*", color="C3", s=160, zorder=3, label="best")
        ax.set_xlabel(knob)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(knobs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_outputs(
    out: Path,
    *,
    metrics: dict[str, Any],
    best_model: torch.nn.Module | None,
    coefficients: dict[str, torch.Tensor],
    block_labels: list[str],
    candidate_names: list[str],
    config: RunConfig,
) -> None:
    """metrics.json, model.safetensors, coefficients.parquet, config.yaml and the heatmaps.

    The caller checks them first (:func:`check_finite`)."""
    import yaml

    write_json(out / "metrics.json", metrics)
    with atomic_path(out / "config.yaml") as tmp, open(tmp, "w") as f:
        yaml.safe_dump(redact(config.to_dict()), f, sort_keys=False)  # URIs without credentials
    if coefficients:
        write_coefficients(
            out / "coefficients.parquet",
            coefficients,
            block_labels=block_labels,
            candidate_names=candidate_names,
        )
        for variant, alpha in coefficients.items():
            plot_coefficients(
                out / f"coefficients_{variant}.png",
                alpha,
                block_labels=block_labels,
                title=f"{variant} coefficients",
            )
    if best_model is not None:  # last: a model safetensors cannot hold leaves the rest written
        write_model(out / "model.safetensors", best_model, {"format": "pt", "source": "twa_ray"})


def check_finite(model: torch.nn.Module | None, coefficients: dict[str, torch.Tensor]) -> None:
    """Refuse a model or coefficients with NaN/Inf (an overflowing average, diverged TWA)."""
    for variant, alpha in coefficients.items():
        if not bool(torch.isfinite(alpha).all()):
            raise ValueError(
                f"the {variant} coefficients hold NaN/Inf: TWA diverged; lower --twa-lr or check the "
                "candidates for huge values (nothing was written)"
            )
    for name, t in model.state_dict().items() if model is not None else ():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"the averaged model has {bad} NaN/Inf values in {name!r}: the average overflowed or "
                "diverged; check the candidates for huge values or lower --twa-lr (nothing was written)"
            )

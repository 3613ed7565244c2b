"""One sweep trial as a Ray Tune function trainable: TWA on a shared candidate store, reported
epoch by epoch so that ASHA can stop it early.

The trial's candidates were written by a sampling run that it shares with other trials
(:mod:`twa_ray.tune`); it builds the subspace over its own subset of them and runs the coefficient
phase in its own process with the core loop (:class:`twa_ray.core.loop.CoefficientLoop`, the
same steps, epochs and data order as every other host). Per TWA epoch:

1. an epoch of coefficient steps, as many as one pass over the train split takes (TWA-t: on the
   train split; TWA-v: cycling the fit part of the val split), on a learning-rate schedule that
   spans all ``twa.epochs`` (the pipeline's coefficient phase counts epochs the same way);
2. BatchNorm re-estimated on the train split (cumulative average), then accuracy on the
   *selection* part of the val split (``val_acc``: the metric ASHA and the sweep select on; no
   trial fits on it) and on the test split (``test_acc``: reported, never used to select);
3. ``tune.report`` with a checkpoint of the loop state (alpha, optimizer, schedule, step; a
   restored sweep resumes the trial from it).

Why in-process and not on a Ray Train worker group: MNIST-1D-sized coefficient phases take
seconds, less than a worker group takes to start; the sweep's parallelism is its trials. A trial
that runs no Ray Train also leaves no placement group behind when ASHA stops it (Ray 2.60 needs
the dashboard's State API to clean those up).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from twa_ray import redact
from twa_ray.core.evaluate import BN_BATCH, EVAL_BATCH
from twa_ray.core.host import build_loop, standard_evaluation
from twa_ray.core.layout import Layout
from twa_ray.core.loop import CoefficientLoop, CoeffState, LoopHooks
from twa_ray.core.start import run_chosen, split_held_out
from twa_ray.core.twa import TWA, build_subspace
from twa_ray.errors import describe
from twa_ray.models import build_model
from twa_ray.ray.group import load_worker_splits
from twa_ray.store import CandidateStore
from twa_ray.tune_plan import PlannedTrial, SweepPlan

__all__ = ["twa_trial", "trial_loop"]

STATE_FILE = "twa_trial.pt"  # the CoeffState at an epoch end (torch.save)


def _loader(ds: Any, batch_size: int, *, seed: int | None = None) -> Any:
    from torch.utils.data import DataLoader

    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=seed is not None, generator=gen)


def twa_trial(config: dict[str, Any], *, plan: SweepPlan) -> None:
    """Ray Tune trainable of one planned trial (``config["trial"]["index"]`` into ``plan``);
    whatever it raises leaves as a :class:`~twa_ray.errors.TwaError` (one line, its class, the
    traceback as text: the driver unpickles no user class)."""
    try:
        _trial(config, plan=plan)
    except Exception as e:
        raise describe(e, again="rerun the sweep with --resume") from None


def _trial(config: dict[str, Any], *, plan: SweepPlan) -> None:
    import ray
    from ray import tune

    redact.install()  # this trial's log records masked
    node_id = ray.get_runtime_context().get_node_id()  # the Ray node (several may share one IP)
    trial = plan.trials[config["trial"]["index"]]
    cfg = trial.config
    torch.set_num_threads(max(1, int(plan.cpus_per_trial)))
    # a trial with GPUs sees them (Ray sets CUDA_VISIBLE_DEVICES): TWA places B on the model's device
    device = torch.device("cuda" if plan.gpus_per_trial > 0 else "cpu")
    static = {"num_candidates": len(trial.candidates), "index": trial.index, "node_id": node_id}
    loop = trial_loop(
        cfg,
        trial,
        store=plan.groups[trial.group].store,
        select_frac=plan.select_frac,
        device=device,
        report=lambda metrics, state: _report({**metrics, **static}, state),
    )
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        loop.load_state(CoeffState.from_dict(state))
    # the start and the kept epoch on the select split; the free averages scored there in any case
    run_chosen(loop, {"last": -1}, "val_acc", score_points=True)


def trial_loop(
    cfg: Any,
    trial: PlannedTrial,
    *,
    store: str,
    select_frac: float,
    device: torch.device,
    report: Callable[[dict[str, Any], CoeffState], None],
) -> CoefficientLoop:
    """The trial's :class:`~twa_ray.core.loop.CoefficientLoop`: its subspace over its subset of
    the shared store, the fit split of its mode, and after every epoch BN re-estimation,
    evaluation and ``report(metrics, state)``."""
    torch.manual_seed(cfg.data.seed)
    # ---- data: train (TWA-t, BN), val = fit (TWA-v) + select (the metric), test (reported)
    splits = load_worker_splits(cfg.data)  # checks --data-root on this node first
    val_fit, val_select = split_held_out(splits.val, select_frac, cfg.data.seed)
    bn_loader = _loader(splits.train, BN_BATCH)
    select_loader, test_loader = _loader(val_select, EVAL_BATCH), _loader(splits.test, EVAL_BATCH)

    # ---- subspace over this trial's subset of the shared store (streamed, one at a time)
    model = build_model(
        cfg.data.model, num_classes=splits.num_classes, input_shape=splits.input_shape
    )
    layout = Layout.from_module(model)
    model.to(device)
    candidates = CandidateStore(store)
    names = trial.candidates
    subspace = build_subspace(lambda: (candidates.read(n) for n in names), layout, cfg.twa)
    twa = TWA(model, subspace, config=cfg.twa)

    # ---- as in the full pipeline: the global batch is sampling's, an epoch is counted on the
    # train split in both modes (TWA-v cycles its smaller split), the schedule spans all epochs
    evaluation = standard_evaluation(bn_loader, {"val": select_loader, "test": test_loader})
    clock = [time.perf_counter()]

    def on_epoch(loop: CoefficientLoop, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        epoch_s, clock[0] = now - clock[0], now
        metrics = {k: record[k] for k in ("val_acc", "val_loss", "test_acc", "test_loss")}
        # the free averages of the trial's candidates on the select split (a fresh trial)
        free = {f"free_{k}_acc": v for k, v in loop.choices.get("start_scores", {}).items()}
        report(
            {
                **metrics,
                **free,
                "train_loss": record["loss"],
                "twa_epoch": record["epoch"],
                "epochs_used": trial.sample_epochs + record["epoch"],
                "epoch_s": epoch_s,
                "finished": record["step"] == loop.total,
            },
            loop.state(),
        )

    return build_loop(
        twa,
        cfg.mode,
        splits.train,
        val_fit,
        batch_size=cfg.sampling.batch_size,
        seed=cfg.data.seed,
        hooks=LoopHooks(evaluate=evaluation, on_epoch=on_epoch),
    )


def _report(metrics: dict[str, Any], state: CoeffState) -> None:
    """``tune.report`` with a checkpoint of the loop state (a restored sweep resumes from it)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state.to_dict(), os.path.join(tmp, STATE_FILE))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

"""One sweep trial as a Ray Tune function trainable: TWA on a shared candidate store, reported
epoch by epoch so that ASHA can stop it early.

The trial's candidates were written by a sampling run that it shares with other trials
(:mod:`twa_ray.tune`); it builds the subspace over its own subset of them and runs the coefficient
phase in its own process with the core engine (:class:`twa_ray.core.twa.TWA`). Per TWA epoch:

1. an epoch of coefficient steps, as many as one pass over the train split takes (TWA-t: on the
   train split; TWA-v: cycling the fit part of the val split), on a learning-rate schedule that
   spans all ``twa.epochs`` (the pipeline's coefficient phase counts epochs the same way);
2. BatchNorm re-estimated on the train split (cumulative average), then accuracy on the
   *selection* part of the val split (``val_acc``: the metric ASHA and the sweep select on; no
   trial fits on it) and on the test split (``test_acc``: reported, never used to select);
3. ``tune.report`` with a checkpoint of alpha + optimizer + schedule (a restored sweep resumes
   the trial from it).

Why in-process and not on a Ray Train worker group: MNIST-1D-sized coefficient phases take
seconds, less than a worker group takes to start; the sweep's parallelism is its trials. A trial
that runs no Ray Train also leaves no placement group behind when ASHA stops it (Ray 2.60 needs
the dashboard's State API to clean those up).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import torch

from twa_ray.core.bn import update_bn
from twa_ray.core.evaluate import evaluate
from twa_ray.core.layout import Layout
from twa_ray.core.twa import TWA, build_subspace
from twa_ray.models import build_model
from twa_ray.ray.group import load_worker_splits
from twa_ray.store import CandidateStore
from twa_ray.tune_plan import SweepPlan

__all__ = ["twa_trial", "split_val"]

STATE_FILE = "twa_trial.pt"  # TWA.state_dict() + the epoch it ends (torch.save)
_EVAL_BATCH = 1024


def split_val(val: Any, *, select_frac: float, seed: int) -> tuple[Any, Any]:
    """``(fit, select)``: a seeded split of the val split; TWA-v fits on ``fit``, every trial is
    scored on ``select``."""
    from torch.utils.data import Subset

    n = len(val)
    num_select = min(max(1, round(select_frac * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(val, perm[num_select:]), Subset(val, perm[:num_select])


def _loader(ds: Any, batch_size: int, *, seed: int | None = None) -> Any:
    from torch.utils.data import DataLoader

    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=seed is not None, generator=gen)


def twa_trial(config: dict[str, Any], *, plan: SweepPlan) -> None:
    """Ray Tune trainable of one planned trial (``config["trial"]["index"]`` into ``plan``)."""
    import ray
    from ray import tune

    node_id = ray.get_runtime_context().get_node_id()  # the Ray node (several may share one IP)
    trial = plan.trials[config["trial"]["index"]]
    cfg = trial.config
    torch.set_num_threads(max(1, int(plan.cpus_per_trial)))
    # a trial with GPUs sees them (Ray sets CUDA_VISIBLE_DEVICES): TWA places B on the model's device
    device = torch.device("cuda" if plan.gpus_per_trial > 0 else "cpu")
    torch.manual_seed(cfg.data.seed)

    # ---- data: train (TWA-t, BN), val = fit (TWA-v) + select (the metric), test (reported)
    splits = load_worker_splits(cfg.data)  # checks --data-root on this node first
    val_fit, val_select = split_val(splits.val, select_frac=plan.select_frac, seed=cfg.data.seed)
    fit_ds = splits.train if cfg.mode == "t" else val_fit
    bn_loader = _loader(splits.train, 512)
    select_loader, test_loader = _loader(val_select, _EVAL_BATCH), _loader(splits.test, _EVAL_BATCH)

    # ---- subspace over this trial's subset of the shared store (streamed, one at a time)
    model = build_model(
        cfg.data.model, num_classes=splits.num_classes, input_shape=splits.input_shape
    )
    layout = Layout.from_module(model)
    model.to(device)
    store = CandidateStore(plan.groups[trial.group].store)
    names = trial.candidates
    subspace = build_subspace(lambda: (store.read(n) for n in names), layout, cfg.twa)
    twa = TWA(model, subspace, config=cfg.twa)

    # ---- as in the full pipeline: the global batch is sampling's, an epoch is one pass over the
    # train split in both modes (TWA-v cycles its smaller split), the schedule spans all epochs
    batch_size = min(cfg.sampling.batch_size, len(fit_ds))
    steps_per_epoch = max(1, len(splits.train) // cfg.sampling.batch_size)
    total = max(1, round(cfg.twa.epochs * steps_per_epoch))
    num_epochs = math.ceil(total / steps_per_epoch)
    twa.start(total)
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        twa.load_state_dict(state["twa"], total_steps=total)
        start_epoch = int(state["epoch"])

    for epoch in range(start_epoch, num_epochs):
        t0 = time.perf_counter()
        steps = min(steps_per_epoch, total - twa.step_count)
        losses: list[float] = []
        # the data order is a function of (seed, epoch): a resumed trial replays it
        loader = _loader(fit_ds, batch_size, seed=cfg.data.seed * 100_003 + epoch)
        twa.fit(loader, steps=steps, on_step=lambda _s, loss, acc=losses: acc.append(loss))
        update_bn(bn_loader, model, device=device)
        val, test = evaluate(model, select_loader, device=device), evaluate(model, test_loader, device=device)
        twa_epoch = twa.step_count / steps_per_epoch
        metrics = {
            "val_acc": val.acc, "val_loss": val.loss, "test_acc": test.acc, "test_loss": test.loss,
            "train_loss": sum(losses) / max(len(losses), 1), "twa_epoch": twa_epoch,
            "epochs_used": trial.sample_epochs + twa_epoch, "num_candidates": len(names),
            "index": trial.index, "epoch_s": time.perf_counter() - t0, "finished": epoch + 1 == num_epochs,
            "node_id": node_id,
        }  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"twa": twa.state_dict(), "epoch": epoch + 1}, os.path.join(tmp, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

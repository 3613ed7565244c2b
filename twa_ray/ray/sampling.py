"""The sampling phase on Ray Train: data-parallel SGD that snapshots candidates into the store.

SGD (momentum, weight decay) follows the learning-rate schedule of the *full* budget of
``SamplingConfig.epochs`` epochs but stops after ``sample_epochs = ceil(sample_frac * epochs)``:
TWA then finishes training from the candidates taken on the way. Per epoch:

1. train on this worker's shard of the train split (a ``DistributedSampler`` seeded by
   ``DataConfig.seed`` and reset with ``set_epoch``: the data order is a function of
   ``(seed, epoch)``, so a resumed run replays the same steps); the val split is never trained on;
2. snapshot candidates every ``sample_interval`` epochs or steps (rank 0 writes; the final epoch
   is always snapshotted, so the last candidate is the final SGD weights);
3. evaluate val and test accuracy (each rank a strided shard, sums all-reduced);
4. at the last epoch, and otherwise at most once per ``checkpoint_interval_s`` seconds,
   ``ray.train.report`` on every rank; rank 0 attaches a checkpoint (model, optimizer, epoch,
   global step, candidates written, history, resolved config).

Fault tolerance: with ``max_failures=N`` Ray restarts all workers from the last checkpoint.
Candidates written between that checkpoint and the failure are rewritten under the same names
(names derive from the global step) by an atomic replace: none is lost or duplicated.

>>> from twa_ray.config import DataConfig, SamplingConfig
>>> res = run_sampling(DataConfig(num_samples=2000), SamplingConfig(epochs=8),  # doctest: +SKIP
...                    store_uri="runs/a/candidates", run_dir="runs/a", run_id="a")
>>> res.candidates[-1], res.final_metrics["test_acc"]                          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from twa_ray.config import TRAJECTORY_FREE_FIELDS, DataConfig, SamplingConfig
from twa_ray.core.optim import lr_factor
from twa_ray.ray.faults import inject
from twa_ray.ray.group import (
    CheckpointClock,
    check_data_root_on_nodes,
    check_run_id,
    fit_group,
    load_worker_splits,
    report,
)
from twa_ray.ray.snapshot import Snapshotter, unwrap_model
from twa_ray.ray.worker import (
    all_reduce_,
    evaluate_sharded,
    loader_options,
    strided,
    train_autocast,
)
from twa_ray.storage import Storage, open_storage
from twa_ray.store.store import CandidateStore

__all__ = ["SamplingResult", "SamplingState", "run_sampling", "sampling_loop_per_worker"]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # model + optimizer state (torch.save; loaded with weights_only=True)
META_FILE = "meta.json"  # a SamplingState (readable without torch)
CONFIG_FILE = "sampling_{run_id}.json"  # resolved config of a run, next to its outputs in run_dir
_EVAL_BATCH = 1024


@dataclass
class SamplingResult:
    """What :func:`run_sampling` produced.

    Attributes:
        run_id: the run's id (stored with every candidate).
        store_uri: the candidate store.
        candidates: names of the candidates written, in step order; the last one is the final
            SGD weights (the final epoch is always snapshotted).
        history: one dict per sampled epoch: ``epoch`` (completed, 1-based), ``step`` (global
            steps done), ``lr`` (of the epoch's last step), ``train_loss``, ``val_loss``,
            ``val_acc``, ``test_loss``, ``test_acc``.
        final_metrics: the last history entry plus ``steps_per_epoch``, ``total_steps`` (of the
            full budget), ``num_train``, ``num_val``, ``num_candidates``.
        wall_time_s: seconds spent in :func:`run_sampling`.
        checkpoint_path: the final Ray Train checkpoint directory (holds ``state.pt`` with the
            full model state, BN statistics included).
    """

    run_id: str
    store_uri: str
    candidates: list[str]
    history: list[dict[str, float]]
    final_metrics: dict[str, float]
    wall_time_s: float
    checkpoint_path: str | None
    checkpoint: Any = None  # the final ray.train.Checkpoint (local or remote storage)

    @property
    def final_candidate(self) -> str:
        """Name of the candidate holding the final SGD weights."""
        if not self.candidates:
            raise ValueError(f"sampling run {self.run_id!r} wrote no candidates")
        return self.candidates[-1]

    def read_final(self) -> torch.Tensor:
        """The final SGD weights as a flat ``(D,)`` float32 vector (trainable parameters only)."""
        return CandidateStore(self.store_uri).read(self.final_candidate)

    def read_final_state(self) -> dict[str, torch.Tensor]:
        """The final model state dict (with BN buffers) from the last Ray Train checkpoint."""
        if self.checkpoint is None:
            raise ValueError(f"sampling run {self.run_id!r} has no checkpoint")
        with self.checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        return state["model"]


@dataclass
class SamplingState:
    """The loop state in every sampling checkpoint (``meta.json``, next to ``state.pt``).

    Attributes:
        epoch: epochs completed; ``step``: global steps done.
        candidates: names written so far, in step order; ``history``: one dict per epoch.
        sizes: ``steps_per_epoch``, ``total_steps``, ``num_train``, ``num_val``.
        config: the worker loop's config.
    """

    epoch: int = 0
    step: int = 0
    candidates: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, checkpoint_dir: str) -> SamplingState:
        import json

        with open(os.path.join(checkpoint_dir, META_FILE)) as f:
            return cls(**json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- driver


def run_sampling(
    data: DataConfig,
    sampling: SamplingConfig,
    *,
    store_uri: str,
    run_dir: str,
    run_id: str,
    progress: bool = True,
) -> SamplingResult:
    """Run the sampling phase as a Ray Train ``TorchTrainer`` and return what it wrote.

    Args:
        data: dataset, model and seed.
        sampling: schedule, snapshot interval and workers.
        store_uri: candidate store (created if missing); it must hold no other run's candidates.
        run_dir: this run's storage (a local path or a ``pyarrow.fs`` URI, shared by the nodes);
            Ray Train writes under ``run_dir/ray_train``, the resolved config goes to
            ``run_dir/sampling_<run_id>.json``.
        run_id: names the run: calling again with the same ``run_id`` and ``run_dir`` resumes
            (or, when finished, just reads back) the run; ``[A-Za-z0-9._-]``.
        progress: rank 0 logs one line per epoch (Ray forwards worker logs to the driver).

    Raises:
        ValueError: bad ``run_id``, a store holding another run's candidates, or a ``run_dir``
            holding this ``run_id`` with a different config.
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    t0 = time.perf_counter()
    problem = check_run_id(run_id)
    if problem:
        raise ValueError(problem)
    rd = open_storage(run_dir)
    _check_store(store_uri, run_id)
    _save_or_check_config(rd, run_id, data, sampling)
    check_data_root_on_nodes(data)

    loop_config = {
        "data": asdict(data),
        "sampling": asdict(sampling),
        "store_uri": store_uri,
        "run_id": run_id,
        "progress": progress,
    }
    # raises TrainingFailedError once max_failures is exhausted
    result = fit_group(
        sampling_loop_per_worker, loop_config, name=f"sampling_{run_id}", run_dir=rd,
        num_workers=sampling.num_workers, cpus_per_worker=sampling.cpus_per_worker,
        use_gpu=sampling.use_gpu, max_failures=sampling.max_failures,
    )  # fmt: skip
    with result.checkpoint.as_directory() as d:
        state = SamplingState.from_dir(d)
    _check_written(store_uri, run_id, state.candidates)
    history = state.history
    final = {**(history[-1] if history else {}), **state.sizes}
    final["num_candidates"] = len(state.candidates)
    return SamplingResult(
        run_id=run_id,
        store_uri=store_uri,
        candidates=list(state.candidates),
        history=history,
        final_metrics=final,
        wall_time_s=time.perf_counter() - t0,
        checkpoint_path=result.checkpoint.path,
        checkpoint=result.checkpoint,
    )


def _check_store(store_uri: str, run_id: str) -> None:
    store = CandidateStore(store_uri, create=True)
    others: dict[str, str] = {}
    for name in store.names():
        owner = store.info(name).run_id
        if owner != run_id:
            others.setdefault(owner, name)
    if others:
        owner, name = next(iter(others.items()))
        raise ValueError(
            f"candidate store {store_uri!r} already holds candidates of another run ({name!r} of "
            f"run {owner!r}); a sampling run needs a store of its own: pass a new store URI, or "
            f"run_id={owner!r} to resume that run"
        )


def _save_or_check_config(
    run_dir: Storage, run_id: str, data: DataConfig, sampling: SamplingConfig
) -> None:
    """Write the resolved config next to the run; refuse to resume a run with another config."""
    resolved: dict[str, Any] = {
        "run_id": run_id,
        "data": asdict(data),
        "sampling": asdict(sampling),
    }
    name = CONFIG_FILE.format(run_id=run_id)
    if run_dir.exists(name):
        old = run_dir.read_json(name)
        diff = [
            f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}"
            for section in ("data", "sampling")
            for k, v in resolved[section].items()
            if k not in TRAJECTORY_FREE_FIELDS and old.get(section, {}).get(k) != v
        ]
        if diff:
            raise ValueError(
                f"{run_dir.uri} already holds sampling run {run_id!r} with another config "
                f"({'; '.join(diff)}); use a new run_id or run_dir, or the original config to resume"
            )
    run_dir.write_json(name, resolved)


def _check_written(store_uri: str, run_id: str, candidates: list[str]) -> None:
    """Every candidate the run recorded is in the store; warn about ones it did not record."""
    store = CandidateStore(store_uri)
    present = set(store.names())
    missing = [n for n in candidates if n not in present]
    if missing:
        raise RuntimeError(
            f"sampling run {run_id!r} recorded {len(missing)} candidate(s) that are not in store "
            f"{store_uri!r} (e.g. {missing[0]!r}): the store was changed behind the run; rerun "
            "with a new run_id and store"
        )
    recorded = set(candidates)
    stale = [n for n in sorted(present - recorded) if store.info(n).run_id == run_id]
    if stale:
        log.warning(
            "store %s holds %d candidate(s) of run %r that the finished run did not write (e.g. %s)",
            store_uri, len(stale), run_id, stale[0],
        )  # fmt: skip


# --------------------------------------------------------------------------- workers


def sampling_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` of :func:`run_sampling` (see the module docstring)."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    from twa_ray.models import build_model
    from twa_ray.ray.logs import quiet_train_logs

    quiet_train_logs()
    data = DataConfig(**config["data"])
    sampling = SamplingConfig(**config["sampling"])
    store_uri, run_id = config["store_uri"], config["run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    # ---- data: train sharded and reshuffled per (seed, epoch); val and test only evaluated
    splits = load_worker_splits(data)
    if sampling.batch_size < world:
        raise ValueError(
            f"batch_size={sampling.batch_size} is smaller than num_workers={world}: the global "
            "batch is split across workers; raise batch_size"
        )
    split_sizes = splits.sizes()
    sampler: DistributedSampler[Any] = DistributedSampler(
        splits.train, num_replicas=world, rank=rank, shuffle=True, seed=data.seed
    )
    # drop_last: equal batches on every rank and no 1-example BatchNorm batch at the epoch end
    loader_kw = loader_options(device)
    loader = DataLoader(
        splits.train, batch_size=sampling.batch_size // world, sampler=sampler, drop_last=True,
        persistent_workers=bool(loader_kw), **loader_kw,
    )  # fmt: skip
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={sampling.batch_size} exceeds the {split_sizes['train']} training examples "
            "(split over the workers); lower batch_size"
        )
    val_loader, test_loader = (
        DataLoader(strided(ds, rank, world), batch_size=_EVAL_BATCH, **loader_kw)
        for ds in (splits.val, splits.test)
    )

    # ---- model and optimizer: identical init on every rank (DDP broadcasts rank 0's anyway)
    torch.manual_seed(data.seed)
    model = build_model(data.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
    model = ray.train.torch.prepare_model(model)
    inner = unwrap_model(model)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=sampling.lr,
        momentum=sampling.momentum,
        weight_decay=sampling.weight_decay,
    )
    total_steps = sampling.epochs * steps_per_epoch  # the schedule spans the FULL budget
    warmup_steps = round(sampling.warmup_epochs * steps_per_epoch)
    step_size = max((total_steps - warmup_steps) // 3, 1)  # 'step': x0.1 at 1/3 and 2/3

    def lr_at(step: int) -> float:
        return sampling.lr * lr_factor(
            step, total_steps, schedule=sampling.schedule, warmup_steps=warmup_steps,
            step_size=step_size, gamma=0.1,
        )  # fmt: skip

    snap = Snapshotter(
        store_uri, model, every=sampling.sample_interval, unit=sampling.interval_unit,
        run_id=run_id, source="sampling", seed=data.seed,
    )  # fmt: skip

    # ---- resume from the last reported checkpoint (after a worker failure or a driver restart)
    resumed = SamplingState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
            resumed = SamplingState.from_dir(d)
        inner.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    start_epoch, global_step = resumed.epoch, resumed.step
    candidates, history = resumed.candidates, resumed.history
    if checkpoint is not None and rank == 0 and config["progress"]:
        log.info("sampling: resumed at epoch %d, step %d", start_epoch, global_step)

    sizes = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_train": split_sizes["train"],
        "num_val": split_sizes["val"],
    }
    clock = CheckpointClock(sampling.checkpoint_interval_s, device)
    for epoch in range(start_epoch, sampling.sample_epochs):
        t_epoch = time.perf_counter()
        # ---- train one epoch
        model.train()
        sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        lr = sampling.lr
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = lr_at(global_step)
            for group in opt.param_groups:
                group["lr"] = lr
            with train_autocast(sampling.precision, device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            global_step += 1
            loss_sum += loss.detach()
            if sampling.interval_unit == "step":
                _record(
                    candidates,
                    snap.maybe_snapshot(step=global_step, epoch=global_step / steps_per_epoch),
                )
            inject("sampling", global_step, rank, world)

        # ---- snapshot (the final epoch always) and evaluate
        last = epoch + 1 == sampling.sample_epochs
        if sampling.interval_unit == "epoch":
            _record(candidates, snap.maybe_snapshot(step=global_step, epoch=epoch + 1, force=last))
        elif last and not snap.due(step=global_step):
            _record(candidates, snap.snapshot(step=global_step, epoch=epoch + 1))
        train_loss = float(all_reduce_(loss_sum)) / (world * steps_per_epoch)
        val = evaluate_sharded(inner, val_loader, device)
        test = evaluate_sharded(inner, test_loader, device)
        if not torch.isfinite(torch.tensor(train_loss)):
            raise FloatingPointError(
                f"sampling diverged in epoch {epoch + 1} (train loss {train_loss}); lower lr={sampling.lr}"
            )
        metrics = {
            "epoch": epoch + 1, "step": global_step, "lr": lr, "train_loss": train_loss,
            "val_loss": val.loss, "val_acc": val.acc, "test_loss": test.loss, "test_acc": test.acc,
        }  # fmt: skip
        history.append(metrics)
        if rank == 0 and config["progress"]:
            # logging, not print: Ray Train 2.60 patches print() in workers and emits it twice
            log.info(
                "sampling epoch %d/%d (of %d), step %d: loss %.4f  lr %.4g  val %.2f%%  test %.2f%%  "
                "candidates %d  [%.1f s]",
                epoch + 1, sampling.sample_epochs, sampling.epochs, global_step, train_loss, lr,
                100 * val.acc, 100 * test.acc, len(candidates), time.perf_counter() - t_epoch,
            )  # fmt: skip

        # ---- checkpoint (the last epoch always; else at most once per checkpoint_interval_s):
        # every rank reports (a barrier); rank 0 attaches the files
        if not clock.due(force=last):
            continue
        files = None
        if rank == 0:
            meta = SamplingState(epoch + 1, global_step, candidates, history, sizes, config)
            files = {
                STATE_FILE: {"model": inner.state_dict(), "optimizer": opt.state_dict()},
                META_FILE: asdict(meta),
            }
        report(metrics, files, f"checkpoint_epoch{epoch + 1:04d}")
        clock.reported()


def _record(candidates: list[str], name: str | None) -> None:
    if name is not None and name not in candidates:
        candidates.append(name)









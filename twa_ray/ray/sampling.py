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
4. ``ray.train.report`` on every rank; rank 0 attaches a checkpoint (model, optimizer, epoch,
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

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from twa_ray.config import DataConfig, SamplingConfig
from twa_ray.core.optim import lr_factor
from twa_ray.ray.snapshot import Snapshotter, unwrap_model
from twa_ray.ray.worker import all_reduce_, evaluate_sharded, maybe_fail, strided
from twa_ray.store.store import CandidateStore

__all__ = ["SamplingResult", "run_sampling", "sampling_loop_per_worker"]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # model + optimizer state (torch.save; loaded with weights_only=True)
META_FILE = "meta.json"  # epoch, step, candidates, history, config (readable without torch)
CONFIG_FILE = "sampling_{run_id}.json"  # resolved config of a run, next to its outputs in run_dir
FAIL_MARKER = ".sampling_{run_id}.failure_injected"
KILL_MARKER = ".sampling_{run_id}.worker_killed"
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Options that may change when a run is resumed (they do not change the trajectory).
_RESUMABLE = ("max_failures", "cpus_per_worker")
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
        if self.checkpoint_path is None:
            raise ValueError(f"sampling run {self.run_id!r} has no checkpoint")
        path = os.path.join(self.checkpoint_path, STATE_FILE)
        return torch.load(path, map_location="cpu", weights_only=True)["model"]

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
    fail_at_step: int | None = None,
    kill_at_step: int | None = None,
) -> SamplingResult:
    """Run the sampling phase as a Ray Train ``TorchTrainer`` and return what it wrote.

    Args:
        data: dataset, model and seed.
        sampling: schedule, snapshot interval and workers.
        store_uri: candidate store (created if missing); it must hold no other run's candidates.
        run_dir: local directory of this run; Ray Train writes under ``run_dir/ray_train``, the
            resolved config goes to ``run_dir/sampling_<run_id>.json``.
        run_id: names the run: calling again with the same ``run_id`` and ``run_dir`` resumes
            (or, when finished, just reads back) the run; ``[A-Za-z0-9._-]``.
        progress: rank 0 logs one line per epoch (Ray forwards worker logs to the driver).
        fail_at_step: testing hook: the last worker raises once right after this global step
            (a marker file in ``run_dir`` keeps the restarted attempt from failing again).
        kill_at_step: testing hook: rank 0 (the writer of candidates and checkpoints) SIGKILLs
            its own process once right after this global step, after that step's snapshot (a
            real process death; its own marker file in ``run_dir``).

    Raises:
        ValueError: bad ``run_id``, a store holding another run's candidates, or a ``run_dir``
            holding this ``run_id`` with a different config.
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"run_id={run_id!r}: use 1-100 characters from [A-Za-z0-9._-]")
    if "://" in run_dir:
        raise ValueError(f"run_dir={run_dir!r} must be a local directory (the store may be remote)")
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    os.makedirs(run_dir, exist_ok=True)
    _check_store(store_uri, run_id)
    _save_or_check_config(run_dir, run_id, data, sampling)

    loop_config = {
        "data": asdict(data),
        "sampling": asdict(sampling),
        "store_uri": store_uri,
        "run_id": run_id,
        "progress": progress,
        "fail_at_step": fail_at_step,
        "fail_marker": os.path.join(run_dir, FAIL_MARKER.format(run_id=run_id)),
        "kill_at_step": kill_at_step,
        "kill_marker": os.path.join(run_dir, KILL_MARKER.format(run_id=run_id)),
    }
    resources = {"CPU": sampling.cpus_per_worker}
    if sampling.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        sampling_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=sampling.num_workers,
            use_gpu=sampling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=f"sampling_{run_id}",
            storage_path=os.path.join(run_dir, "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=sampling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()  # raises TrainingFailedError once max_failures is exhausted
    if result.checkpoint is None:
        raise RuntimeError(f"sampling run {run_id!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as d, open(os.path.join(d, META_FILE)) as f:
        meta = json.load(f)
    _check_written(store_uri, run_id, meta["candidates"])
    history = meta["history"]
    final = {**(history[-1] if history else {}), **meta["sizes"]}
    final["num_candidates"] = len(meta["candidates"])
    return SamplingResult(
        run_id=run_id,
        store_uri=store_uri,
        candidates=list(meta["candidates"]),
        history=history,
        final_metrics=final,
        wall_time_s=time.perf_counter() - t0,
        checkpoint_path=result.checkpoint.path,
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
    run_dir: str, run_id: str, data: DataConfig, sampling: SamplingConfig
) -> None:
    """Write the resolved config next to the run; refuse to resume a run with another config."""
    resolved: dict[str, Any] = {
        "run_id": run_id,
        "data": asdict(data),
        "sampling": asdict(sampling),
    }
    path = os.path.join(run_dir, CONFIG_FILE.format(run_id=run_id))
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [
            f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}"
            for section in ("data", "sampling")
            for k, v in resolved[section].items()
            if k not in _RESUMABLE and old.get(section, {}).get(k) != v
        ]
        if diff:
            raise ValueError(
                f"{run_dir} already holds sampling run {run_id!r} with another config "
                f"({'; '.join(diff)}); use a new run_id or run_dir, or the original config to resume"
            )
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(resolved, f, indent=2)
    os.replace(tmp, path)


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

    from twa_ray.data import load_dataset
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
    splits = load_dataset(
        data.dataset, root=data.data_root, val_frac=data.val_frac, seed=data.seed,
        num_samples=data.num_samples,
    )  # fmt: skip
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
    loader = DataLoader(
        splits.train, batch_size=sampling.batch_size // world, sampler=sampler, drop_last=True
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={sampling.batch_size} exceeds the {split_sizes['train']} training examples "
            "(split over the workers); lower batch_size"
        )
    val_loader, test_loader = (
        DataLoader(strided(ds, rank, world), batch_size=_EVAL_BATCH) for ds in (splits.val, splits.test)
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
    start_epoch, global_step = 0, 0
    candidates: list[str] = []
    history: list[dict[str, float]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
            with open(os.path.join(d, META_FILE)) as f:
                meta = json.load(f)
        inner.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, global_step = meta["epoch"], meta["step"]
        candidates, history = meta["candidates"], meta["history"]
        if rank == 0 and config["progress"]:
            log.info("sampling: resumed at epoch %d, step %d", start_epoch, global_step)

    sizes = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_train": split_sizes["train"],
        "num_val": split_sizes["val"],
    }
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
            maybe_fail(config, global_step, rank, world)

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

        # ---- report: every rank (a barrier); rank 0 attaches the checkpoint
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(
                    {"model": inner.state_dict(), "optimizer": opt.state_dict()},
                    os.path.join(tmp, STATE_FILE),
                )
                meta = {
                    "epoch": epoch + 1, "step": global_step, "candidates": candidates,
                    "history": history, "sizes": sizes, "config": config,
                }  # fmt: skip
                with open(os.path.join(tmp, META_FILE), "w") as f:
                    json.dump(meta, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(
                metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch{epoch + 1:04d}"
            )


def _record(candidates: list[str], name: str | None) -> None:
    if name is not None and name not in candidates:
        candidates.append(name)









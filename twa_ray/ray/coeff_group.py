"""The coefficient phase on N Ray Train workers: all-reduce K·L coefficients, not D gradients.

Every worker holds a replica of alpha and a zero-copy view of the packed basis B (object store,
:mod:`twa_ray.ray.shards`). Per step, on worker r with its batch:

.. math::
    a^{(r)} = B\\,\\nabla_\\theta \\ell(\\theta(\\alpha); \\text{batch}_r), \\qquad
    a = \\frac1N \\sum_r a^{(r)} \\ \\text{(all-gather of } K \\cdot L \\text{ float32)}, \\qquad
    \\alpha \\leftarrow \\mathrm{step}(\\alpha, a), \\quad \\theta = o + \\textstyle\\sum \\alpha B

All workers apply the same ``a`` to the same optimizer state, so their alphas stay bit-identical
(checked at the end). That is ``basis_placement='replicate'``; with ``'shard'`` each worker holds
only its shards of B (B / N per worker and device) and the step trades gradient and weight slices
instead (:mod:`twa_ray.core.placement`; the same alpha bit for bit); ``'auto'`` shards when B and
the model do not fit comfortably in a worker's memory. The choice, its reason, the bytes of B
held per worker and sent per step are in every result's ``extra``.

TWA-t optimizes on the train split, TWA-v on the held-out val split; both take
``round(epochs * steps per training epoch)`` steps (TWA-v cycles its smaller split). Then:

1. BatchNorm statistics are re-estimated on the whole train split: every worker runs
   ``update_bn`` over its strided shard (``n_r`` batches); the cumulative averages combine as
   :math:`\\sum_r n_r \\mu_r / \\sum_r n_r` (all-reduce), the same as one ``update_bn`` over the
   union of the shards' batches;
2. val and test are evaluated on strided shards, sums all-reduced;
3. the SWA point (alpha0) gets the same BN + evaluation (``eval_swa``), for the report.

Fault tolerance: rank 0 checkpoints alpha + optimizer + schedule + step at the end of a pass
over the fit split or every ``checkpoint_every`` steps, at most once per
``checkpoint_interval_s`` seconds, and at each mode's end; with ``max_failures`` Ray restarts all
workers from the last checkpoint, and the data order (a function of seed, pass and step)
replays exactly.

>>> sharded = put_subspace(store, layout, TWAConfig(bits=4))               # doctest: +SKIP
>>> res = run_twa(sharded, DataConfig(), TWAConfig(bits=4), run_dir="runs/a")  # doctest: +SKIP
>>> res["v"].test_acc, res["v"].swa["test_acc"]                            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from twa_ray.config import DataConfig
from twa_ray.core.bn import bn_state, load_bn_state_, update_bn
from twa_ray.core.kernels.cpu import kernel_info
from twa_ray.core.layout import Layout, load_flat_
from twa_ray.core.twa import TWA, TWAConfig
from twa_ray.ray.group import (
    CheckpointClock,
    check_data_root_on_nodes,
    check_run_id,
    fit_group,
    load_worker_splits,
    marker_path,
    report,
)
from twa_ray.ray.shards import ShardedSubspace
from twa_ray.ray.worker import evaluate_sharded, loader_options, maybe_fail, strided
from twa_ray.storage import open_storage

__all__ = ["MODES", "TWAResult", "coeff_loop_per_worker", "run_twa"]

log = logging.getLogger(__name__)

MODES = ("t", "v")
STATE_FILE = "coeff.pt"  # alpha, optimizer, scheduler, step + loop state (torch.save)
RESULT_FILE = "result.pt"  # the final TWAResult fields (alpha, BN state, metrics)
FAIL_MARKER = ".twa_{run_id}.failure_injected"
KILL_MARKER = ".twa_{run_id}.worker_killed"
_EVAL_BATCH = 1024


@dataclass
class TWAResult:
    """The outcome of one coefficient phase (one mode).

    Attributes:
        mode: "t" (coefficients learned on train data) or "v" (on held-out val data).
        alpha: (R, L) float32 final coefficients; ``theta = o + sum alpha B``
            (:meth:`theta` rebuilds it from the subspace).
        bn_state: float64 BatchNorm running statistics at ``theta`` (``core.bn.bn_state`` order),
            re-estimated on the whole train split across workers.
        val_loss, val_acc, test_loss, test_acc: at ``theta`` with ``bn_state``.
        swa: the same four metrics at the SWA point (alpha0, BN re-estimated), or None.
        history: one dict per (possibly partial) pass over the fit split (train for TWA-t, val
            for TWA-v): ``epoch`` (training-data epochs of budget so far), ``step``, ``pass``,
            ``lr``, ``loss``, ``acc`` (on the fit split, all workers).
        steps: coefficient steps taken, ``round(epochs * steps_per_epoch)`` in both modes.
        steps_per_epoch: steps per epoch of the *training* data (the budget unit): TWA-v takes
            as many steps as TWA-t, cycling the held-out split.
        steps_per_pass: steps per pass over the fit split.
        bytes_allreduced_per_step: bytes of the per-step all-reduce (K·L·4).
        num_workers: N.
        alpha_identical: every worker ended with bit-identical alpha (sha256 compared).
        restarts: worker-group restarts from a checkpoint in the lineage of the final checkpoint
            (failures survived; a checkpoint reported just before a worker died can be lost with
            it, and the failures since the checkpoint before then count once).
        wall_time_s: driver seconds of the whole Ray Train run (all modes: one worker group);
            ``train_time_s``: seconds of this mode's coefficient loop (rank 0, last attempt).
        checkpoint_path: the final Ray Train checkpoint (holds ``result.pt`` and ``coeff.pt``).
    """

    mode: str
    alpha: torch.Tensor
    bn_state: torch.Tensor
    val_loss: float
    val_acc: float
    test_loss: float
    test_acc: float
    swa: dict[str, float] | None
    history: list[dict[str, float]]
    steps: int
    steps_per_epoch: int
    bytes_allreduced_per_step: int
    num_workers: int
    alpha_identical: bool
    restarts: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    checkpoint_path: str | None = None
    steps_per_pass: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def theta(self, sharded: ShardedSubspace) -> torch.Tensor:
        """The final weights ``o + sum alpha B`` as a flat (D,) float32 tensor."""
        return sharded.materialize().reconstruct(self.alpha.float().contiguous())

    def load_into_(self, model: torch.nn.Module, sharded: ShardedSubspace) -> torch.nn.Module:
        """Write the final weights and BN statistics into ``model`` (built like the workers')."""
        layout = Layout.from_module(model)
        layout.check_compatible(sharded.layout, "the subspace")
        load_flat_(model, self.theta(sharded), layout)
        load_bn_state_(model, self.bn_state)
        return model

    def summary(self) -> dict[str, Any]:
        """JSON-friendly fields (no tensors)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("alpha", "bn_state")}
        d["alpha_shape"] = list(self.alpha.shape)
        return d


# --------------------------------------------------------------------------- driver


def run_twa(
    sharded: ShardedSubspace,
    data: DataConfig,
    twa: TWAConfig,
    *,
    run_dir: str,
    modes: Sequence[str] = MODES,
    num_workers: int = 2,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    batch_size: int = 128,
    bn_batches: int | None = None,
    checkpoint_every: int = 50,
    checkpoint_interval_s: float = 10.0,
    max_failures: int = 1,
    eval_swa: bool = True,
    run_id: str = "twa",
    progress: bool = True,
    fail_at_step: int | None = None,
    kill_at_step: int | None = None,
) -> dict[str, TWAResult]:
    """Learn the coefficients on ``num_workers`` Ray Train workers, for each mode in turn.

    One ``TorchTrainer`` runs all modes (data, model and the subspace view are set up once per
    worker); a checkpoint records the finished modes, so a restart skips them.

    Args:
        sharded: the subspace in the object store (:func:`twa_ray.ray.shards.put_subspace`);
            keep the handle alive until this returns.
        data: dataset and model (the model must have the subspace's layout).
        twa: optimizer, schedule and epochs of the coefficient phase.
        run_dir: the run's storage (a local path or a ``pyarrow.fs`` URI, shared by the nodes);
            Ray Train writes under ``run_dir/ray_train``, the resolved config goes to
            ``run_dir/twa_<run_id>.json``, each mode's summary to ``twa_<run_id>_<mode>.json``.
        modes: "t" (train split) and/or "v" (held-out val split).
        num_workers, cpus_per_worker, use_gpu: the worker group.
        batch_size: global batch of the coefficient steps (split across workers).
        bn_batches: cap on each worker's BN re-estimation batches (None: its whole shard).
        checkpoint_every: rank 0 checkpoints every this many steps and at every pass end...
        checkpoint_interval_s: ...at most once per this many seconds (0: every time); each
            mode's end always checkpoints.
        max_failures: worker-group failures survived by restarting from the last checkpoint.
        eval_swa: also evaluate the SWA point (alpha0; BN re-estimated the same way).
        run_id: names the Ray Train run (``twa_<run_id>``); the same id and run_dir resume.
        progress: rank 0 prints one line per epoch.
        fail_at_step: testing hook: the last worker raises once per run, after this step of the
            first mode that reaches it (a marker file in ``run_dir`` prevents a second failure).
        kill_at_step: testing hook: the same, but rank 0 (the checkpoint writer) SIGKILLs its
            own process (a real process death; its own marker file).

    Returns:
        ``{mode: TWAResult}``; every result carries the SWA metrics when ``eval_swa``.

    Raises:
        ValueError: a bad argument (named in the message).
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    errors = []
    bad_modes = [m for m in modes if m not in MODES]
    if not modes or bad_modes:
        errors.append(f"modes={tuple(modes)!r}: use a non-empty subset of {MODES}")
    if num_workers < 1:
        errors.append(f"num_workers={num_workers}: must be >= 1")
    if batch_size < num_workers:
        errors.append(f"batch_size={batch_size}: must be >= num_workers={num_workers}")
    if checkpoint_every < 1:
        errors.append(f"checkpoint_every={checkpoint_every}: must be >= 1")
    if not checkpoint_interval_s >= 0:
        errors.append(f"checkpoint_interval_s={checkpoint_interval_s}: must be >= 0")
    if bn_batches is not None and bn_batches < 1:
        errors.append(f"bn_batches={bn_batches}: must be >= 1 or None")
    if max_failures < 0:
        errors.append(f"max_failures={max_failures}: must be >= 0")
    if check_run_id(run_id):
        errors.append(str(check_run_id(run_id)))
    if not isinstance(sharded, ShardedSubspace):
        errors.append(f"sharded is a {type(sharded).__name__}; pass shards.put_subspace(...)")
    if errors:
        raise ValueError("invalid coefficient-phase arguments: " + "; ".join(errors))
    rd = open_storage(run_dir)
    check_data_root_on_nodes(data)
    options = {
        "num_workers": num_workers, "cpus_per_worker": cpus_per_worker, "use_gpu": use_gpu,
        "batch_size": batch_size, "bn_batches": bn_batches, "checkpoint_every": checkpoint_every,
        "checkpoint_interval_s": checkpoint_interval_s, "max_failures": max_failures,
        "modes": list(modes),
    }  # fmt: skip
    resolved = {
        "run_id": run_id, "data": asdict(data), "twa": twa.to_dict(), "options": options,
        "subspace": sharded.summary(),
    }  # fmt: skip
    rd.write_json(f"twa_{run_id}.json", resolved)

    loop_config = {
        "data": asdict(data), "twa": twa.to_dict(), "sharded": sharded, "modes": list(modes),
        "batch_size": batch_size, "bn_batches": bn_batches, "checkpoint_every": checkpoint_every,
        "checkpoint_interval_s": checkpoint_interval_s, "eval_swa": eval_swa, "progress": progress,
        "fail_at_step": fail_at_step,
        "fail_marker": marker_path(rd, FAIL_MARKER.format(run_id=run_id)),
        "kill_at_step": kill_at_step,
        "kill_marker": marker_path(rd, KILL_MARKER.format(run_id=run_id)),
    }  # fmt: skip
    # one worker group for all modes: data, model and the subspace view are set up once
    t0 = time.perf_counter()
    result = fit_group(
        coeff_loop_per_worker, loop_config, name=f"twa_{run_id}", run_dir=rd,
        num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
        max_failures=max_failures,
    )  # fmt: skip  # raises TrainingFailedError once max_failures is exhausted
    wall = time.perf_counter() - t0
    with result.checkpoint.as_directory() as d:
        out = torch.load(os.path.join(d, RESULT_FILE), map_location="cpu", weights_only=True)
    results = {}
    for mode in modes:
        res = TWAResult(**out[mode], wall_time_s=wall, checkpoint_path=result.checkpoint.path)
        results[mode] = res
        rd.write_json(f"twa_{run_id}_{mode}.json", res.summary())
    return results


# --------------------------------------------------------------------------- workers




def coeff_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` of :func:`run_twa` (see the module docstring)."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    from twa_ray.models import build_model
    from twa_ray.ray.logs import quiet_train_logs

    quiet_train_logs()
    data = DataConfig(**config["data"])
    twa_cfg = TWAConfig.from_dict(config["twa"])
    sharded: ShardedSubspace = config["sharded"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    per_worker = int(config["batch_size"]) // world

    # ---- data: train (TWA-t, BN statistics), held-out val (TWA-v, report), test (report)
    splits = load_worker_splits(data)
    loader_kw = loader_options(device)
    bn_loader = DataLoader(strided(splits.train, rank, world), batch_size=per_worker, **loader_kw)
    val_loader, test_loader = (
        DataLoader(strided(ds, rank, world), batch_size=_EVAL_BATCH, **loader_kw)
        for ds in (splits.val, splits.test)
    )

    # ---- model + B placed once on this worker's device (all of it, or its shards): every
    # mode, the BN update and the evaluation reuse it. CPU: zero-copy views of the object store
    torch.manual_seed(data.seed)
    model = build_model(data.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
    model = model.to(device)
    Layout.from_module(model).check_compatible(sharded.layout, "the subspace")
    kind, reason = _choose_placement(twa_cfg.basis_placement, sharded, model, device, world)
    placement = sharded.place(kind, rank=rank, world=world, device=device)
    extra = {"basis_placement": kind, "basis_placement_reason": reason,
             "basis_held_bytes": placement.held_bytes,
             "wire_bytes_per_step": placement.wire_bytes_per_step}  # fmt: skip
    if device.type == "cpu":  # the packed-kernel path measured on this worker's CPU
        extra["kernel"] = kernel_info()
    if rank == 0:
        log.info("twa: basis placement %s (%s); B held per worker %.1f MiB of %.1f MiB",
                 kind, reason, placement.held_bytes / 2**20, sharded.nbytes / 2**20)  # fmt: skip

    def finish(twa: TWA) -> tuple[torch.Tensor, dict[str, float]]:
        return _finish(twa, bn_loader, val_loader, test_loader, device, config["bn_batches"])

    # ---- resume from the last reported checkpoint: finished modes, the current mode's state
    ckpt = CoeffState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            ckpt = CoeffState.from_dict(
                torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            )
        ckpt.restarts += 1
        if rank == 0 and config["progress"]:
            cur = ckpt.current
            where = f"mode {cur.mode} step {cur.twa['step']}" if cur else "a mode boundary"
            log.info("twa: resumed at %s (done: %s)", where, sorted(ckpt.done))

    clock = CheckpointClock(config["checkpoint_interval_s"], device)
    for mode in config["modes"]:
        if mode in ckpt.done:
            continue
        twa = TWA(model, placement, config=twa_cfg)  # no copy of B: it is on the device already
        # ---- the SWA point (alpha0, where the first mode starts), BN re-estimated, for the report
        # (the BN statistics it leaves behind do not matter: coefficient steps run in train mode)
        if config["eval_swa"] and ckpt.swa is None:
            ckpt.swa = finish(twa)[1]
        out = _fit_mode(twa, mode, splits, ckpt, config, finish, clock, rank=rank, world=world)
        ckpt.done[mode], ckpt.current = {**out, "extra": extra}, None
        metrics = {
            k: out[k] for k in ("mode", "steps", "val_loss", "val_acc", "test_loss", "test_acc")
        }
        _report(metrics, ckpt.to_dict() if rank == 0 else None, f"checkpoint_{mode}_final")
        clock.reported()
    # ---- the result: every mode's outcome, read back by the driver from the last checkpoint
    results = {m: {**ckpt.done[m], "swa": ckpt.swa, "restarts": ckpt.restarts}
               for m in config["modes"]}  # fmt: skip
    metrics = {f"{m}_{k}": r[k] for m, r in results.items() for k in ("val_acc", "test_acc")}
    _report(
        metrics,
        ckpt.to_dict() if rank == 0 else None,
        "checkpoint_final",
        result=results if rank == 0 else None,
    )


@dataclass
class ModeProgress:
    """The coefficient steps of one mode in flight (checkpointed every ``checkpoint_every``)."""

    mode: str
    twa: dict[str, Any]
    """:meth:`TWA.state_dict`: alpha, optimizer, schedule, step."""
    history: list[dict[str, Any]]
    """One dict per finished pass over the fit split."""
    pass_sums: torch.Tensor
    """(3,) float64 loss sum, correct, count of the current pass, all workers."""


@dataclass
class CoeffState:
    """What rank 0 checkpoints (``coeff.pt``, saved as a plain dict: ``weights_only`` loads)."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Finished modes: their result fields."""
    current: ModeProgress | None = None
    """The mode in flight, if any."""
    swa: dict[str, float] | None = None
    """Metrics of the SWA point (evaluated once, before the first mode)."""
    restarts: int = 0
    """Worker-group restarts in this checkpoint's lineage."""

    def to_dict(self) -> dict[str, Any]:
        cur = None if self.current is None else vars(self.current)
        return {"done": self.done, "current": cur, "swa": self.swa, "restarts": self.restarts}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoeffState:
        cur = d["current"]
        return cls(done=d["done"], current=None if cur is None else ModeProgress(**cur),
                   swa=d["swa"], restarts=int(d["restarts"]))  # fmt: skip


def _choose_placement(
    requested: str, sharded: ShardedSubspace, model: torch.nn.Module, device: torch.device,
    world: int,
) -> tuple[str, str]:  # fmt: skip
    """:func:`twa_ray.core.placement.choose` with this worker's memory; every worker takes
    'shard' when one of them must (a MAX all-reduce), so that all agree."""
    import torch.distributed as dist

    from twa_ray.core.placement import choose
    from twa_ray.ray.shards import worker_capacity

    capacity, where = worker_capacity(device)
    # GPU: weights, gradients, the flat theta and g next to B; CPU: B lives in the object store
    model_bytes = 4 * sum(p.numel() * 4 for p in model.parameters()) if device.type == "cuda" else 0
    kind, reason = choose(
        requested, basis_bytes=sharded.nbytes, model_bytes=model_bytes, capacity_bytes=capacity,
        world=world, num_shards=sharded.num_shards, where=where,
    )  # fmt: skip
    if requested == "auto" and world > 1:
        flag = torch.tensor([float(kind == "shard")], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and kind == "replicate":
            kind, reason = "shard", "auto: B does not fit comfortably on another worker"
    return kind, reason


def _fit_mode(
    twa: TWA,
    mode: str,
    splits: Any,
    ckpt: CoeffState,
    config: dict[str, Any],
    finish: Any,
    clock: CheckpointClock,
    *,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """One mode's coefficient steps (resuming ``ckpt.current``), BN, evaluation, checks;
    checkpoints when ``clock`` says so."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    data = DataConfig(**config["data"])
    per_worker = int(config["batch_size"]) // world
    fit_ds = splits.train if mode == "t" else splits.val
    sampler: DistributedSampler[Any] = DistributedSampler(
        fit_ds, num_replicas=world, rank=rank, shuffle=True, seed=data.seed
    )
    steps_per_pass = len(sampler) // per_worker  # drop_last: equal batches on every rank
    if steps_per_pass == 0:
        raise ValueError(
            f"batch_size={config['batch_size']} exceeds the {len(fit_ds)} examples of the "
            f"{'train' if mode == 't' else 'val'} split (over {world} workers); lower batch_size"
        )
    # the budget is counted in epochs of the training data, for both modes: TWA-v takes as many
    # steps as TWA-t, cycling the (smaller) held-out split
    steps_per_epoch = max(1, math.ceil(len(splits.train) / world) // per_worker)
    total = max(1, round(twa.config.epochs * steps_per_epoch))
    twa.start(total)
    coeff_bytes = twa.alpha.numel() * twa.alpha.element_size()  # K·L·4: the coefficients' size
    history: list[dict[str, Any]] = []
    # loss_sum, correct, count of all workers in this pass (on the device: nccl reduces there)
    pass_sums = torch.zeros(3, dtype=torch.float64, device=twa.device)
    current = ckpt.current
    if current is not None and current.mode == mode:
        twa.load_state_dict(current.twa, total_steps=total)
        history, pass_sums = current.history, current.pass_sums.double().to(twa.device)

    local_sums = torch.zeros_like(pass_sums)  # since the last report, this worker only
    t0 = time.perf_counter()
    while twa.step_count < total:
        passes = twa.step_count // steps_per_pass  # completed passes over the fit split
        skip = twa.step_count - passes * steps_per_pass  # steps of this pass done before a restart
        sampler.set_epoch(passes)  # the data order is a function of (seed, pass): replayable
        order = list(sampler)[skip * per_worker :]
        loader = DataLoader(fit_ds, batch_size=per_worker, sampler=order, drop_last=True,
                            **loader_options(twa.device))  # fmt: skip
        for batch in loader:
            # a: the mean over all workers' batches, through the placement's collectives
            # (replicate: an all-gather of R·L numbers; shard: see twa_ray.core.placement)
            a, loss_sum, correct, count = twa.coefficient_grad(batch)
            twa.apply_(a)
            step = twa.step_count
            local_sums += torch.tensor(
                [loss_sum, correct, count], dtype=torch.float64, device=twa.device
            )
            maybe_fail(config, step, rank, world)
            pass_end = step % steps_per_pass == 0 or step == total
            if pass_end or step % config["checkpoint_every"] == 0:
                dist.all_reduce(local_sums)
                pass_sums += local_sums
                local_sums.zero_()
                loss, acc = (
                    (pass_sums[0] / pass_sums[2]).item(),
                    (pass_sums[1] / pass_sums[2]).item(),
                )
                lr = twa.optimizer.param_groups[0]["lr"]  # type: ignore[union-attr]
                metrics = {"mode": mode, "epoch": step / steps_per_epoch, "step": step,
                           "pass": math.ceil(step / steps_per_pass), "lr": lr, "loss": loss,
                           "acc": acc}  # fmt: skip
                if pass_end:
                    history.append(metrics)
                    pass_sums.zero_()
                    if rank == 0 and config["progress"]:
                        # logging, not print: Ray Train patches print() in workers and emits it twice
                        log.info("twa-%s epoch %.2f step %d/%d: loss %.4f acc %.2f%% lr %.4g",
                                 mode, step / steps_per_epoch, step, total, loss, 100 * acc, lr)  # fmt: skip
                if clock.due():
                    ckpt.current = ModeProgress(mode, twa.state_dict(), history, pass_sums.cpu())
                    _report(metrics, ckpt.to_dict() if rank == 0 else None,
                            f"checkpoint_{mode}_step{step:07d}")  # fmt: skip
                    clock.reported()
            if step >= total:
                break
    train_time = time.perf_counter() - t0

    # ---- BN re-estimation on all workers' train shards, evaluation, consistency check
    bn, final = finish(twa)
    digest = hashlib.sha256(twa.alpha.detach().cpu().numpy().tobytes()).hexdigest()
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, digest)
    identical = len(set(digests)) == 1
    if rank == 0 and config["progress"]:
        swa = ckpt.swa
        swa_txt = f" (SWA {100 * swa['test_acc']:.2f}%)" if swa else ""
        log.info("twa-%s done: val %.2f%% test %.2f%%%s; alpha identical on %d workers: %s",
                 mode, 100 * final["val_acc"], 100 * final["test_acc"], swa_txt, world, identical)  # fmt: skip
    return {
        "mode": mode, "alpha": twa.alpha.detach().cpu().clone(), "bn_state": bn.cpu(), **final,
        "history": history, "steps": twa.step_count, "steps_per_epoch": steps_per_epoch,
        "steps_per_pass": steps_per_pass,
        "bytes_allreduced_per_step": coeff_bytes, "num_workers": world,
        "alpha_identical": identical, "train_time_s": train_time,
    }  # fmt: skip


def _finish(
    twa: TWA, bn_loader: Any, val_loader: Any, test_loader: Any, device: torch.device,
    bn_batches: int | None,
) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """BN statistics combined over all workers, loaded into the model; val and test metrics."""
    bn = all_reduce_bn_(twa.model, bn_loader, device=device, max_batches=bn_batches)
    val = evaluate_sharded(twa.model, val_loader, device)
    test = evaluate_sharded(twa.model, test_loader, device)
    return bn, {
        "val_loss": val.loss,
        "val_acc": val.acc,
        "test_loss": test.loss,
        "test_acc": test.acc,
    }


def all_reduce_bn_(
    model: torch.nn.Module, loader: Any, *, device: torch.device | None = None,
    max_batches: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """``update_bn`` on this worker's batches, then the batch-weighted average over all workers.

    :math:`\\mu = \\sum_r n_r \\mu_r / \\sum_r n_r` (means and variances alike): the cumulative
    average over the union of all workers' batches. Returns the combined ``bn_state`` (float64).
    """
    import torch.distributed as dist

    n = update_bn(loader, model, device=device, max_batches=max_batches)
    state = bn_state(model)
    if state.numel() == 0:
        return state
    sums = torch.cat(
        [state * n, torch.tensor([float(n)], dtype=torch.float64, device=state.device)]
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    if sums[-1] <= 0:
        raise ValueError("no batches to re-estimate BatchNorm statistics: the train split is empty")
    combined = sums[:-1] / sums[-1]
    load_bn_state_(model, combined)
    return combined




def _report(
    metrics: dict[str, Any],
    state: dict[str, Any] | None,
    name: str,
    result: dict[str, Any] | None = None,
) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 (``state`` given) checkpoints."""
    files = None
    if state is not None:
        files = {STATE_FILE: state, **({RESULT_FILE: result} if result is not None else {})}
    report(metrics, files, name)



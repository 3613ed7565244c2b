"""Snapshot candidates while a model trains: the one writer of every trainer (a Ray Train
``train_loop_per_worker``, yours or ours, and the Lightning / Hugging Face callbacks).

Only world rank 0 writes (:func:`world`); the model is unwrapped from DDP first, so the stored
layout is the plain model's (``Layout.from_module(model)``: trainable parameters, no ``module.``
prefix). Names derive from the global step (:func:`candidate_name`: ``step00001200``), so a run
restarted from its last checkpoint rewrites the same names instead of adding duplicates: a
candidate that already exists and belongs to the same ``run_id`` is replaced atomically (or kept,
``replace=False``); one from another run is refused. Stores written under the earlier names
(``step-000001200``, ``<run>-step-000001200``) stay readable (:func:`candidate_step`).

The public entry point is :func:`snapshot` (``twa_ray.snapshot``: one call per snapshot, in any
loop); :class:`Snapshotter` adds an interval (``every`` steps or epochs)::

    snap = Snapshotter(config["store"], model, every=200, unit="step")
    for x, y in loader:
        ...  # forward, backward, optimizer.step()
        step += 1
        snap.maybe_snapshot(step=step, epoch=step / len(loader))
    snap.maybe_snapshot(step=step, epoch=epochs, force=True)  # the final weights

A resumed run should restart ``step`` from its checkpoint so that names repeat.
"""

from __future__ import annotations

import math
import re
import sys
import weakref
from typing import Any, Literal

import torch
from torch import nn

from twa_ray.core.layout import Layout
from twa_ray.core.sharded import LocalShards, local_flat
from twa_ray.store.store import CandidateStore

__all__ = [
    "Snapshotter",
    "candidate_name",
    "candidate_step",
    "snapshot",
    "snapshot_due",
    "snapshot_shards",
    "is_sharded",
    "unwrap_model",
    "world",
]

_STEP_NAME = re.compile(r"(?:.+-)?step-?(\d+)")


def candidate_name(step: int) -> str:
    """The store name of the candidate taken after global step ``step`` (``step00001200``)."""
    return f"step{step:08d}"


def candidate_step(name: str) -> int | None:
    """The global step a snapshot's name encodes, under this scheme or an earlier one
    (``step-000001200``, ``<run>-step-000001200``); None for other names (imported ones)."""
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def snapshot_due(*, step: int, epoch: float, every: int, unit: Literal["step", "epoch"]) -> bool:
    """Whether an interval of ``every`` ``unit`` asks for a snapshot: ``unit='step'``: when
    ``step % every == 0``; ``'epoch'``: when ``epoch`` (completed epochs) is a whole multiple."""
    if unit == "step":
        return step > 0 and step % every == 0
    whole = math.isclose(epoch, round(epoch), abs_tol=1e-9)
    return whole and round(epoch) > 0 and round(epoch) % every == 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside (possibly nested) ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _train_context() -> Any:
    """Ray Train's context inside a Train worker, ``None`` elsewhere (driver, plain script, a
    process without Ray: Ray is never imported here)."""
    if "ray" not in sys.modules:
        return None
    try:
        import ray.train

        return ray.train.get_context()
    except (ImportError, RuntimeError):
        return None


def world() -> tuple[int, int]:
    """``(rank, world size)``: of the Ray Train run, else of the ``torch.distributed`` group,
    else ``(0, 1)``."""
    ctx = _train_context()
    if ctx is not None:
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Snapshotter:
    """Write a model's trainable parameters into a :class:`CandidateStore` every ``every`` units.

    Args:
        store_uri: the candidate store (local path or ``pyarrow.fs`` URI; created if missing).
        model: the model being trained (a DDP wrapper is fine: its ``.module`` is stored).
        every: snapshot interval, >= 1.
        unit: ``"step"``: when ``step % every == 0``; ``"epoch"``: when the (integral) number of
            completed epochs passed as ``epoch`` is a multiple of ``every``.
        run_id: stored with each candidate and used to tell this run's candidates from others';
            default: the Ray Train run name (stable across restarts), or ``""`` outside Train.
        source, seed: metadata stored with each candidate.
        replace: a step already in the store is rewritten (True: a replayed step's weights) or
            kept as it is (False).

    Attributes:
        written: names written by this process (rank 0), in order.
    """

    def __init__(
        self,
        store_uri: str,
        model: nn.Module,
        *,
        every: int,
        unit: Literal["step", "epoch"] = "step",
        run_id: str | None = None,
        source: str = "snapshot",
        seed: int | None = None,
        replace: bool = True,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every={every!r}: the snapshot interval must be an int >= 1")
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit={unit!r}: use 'step' or 'epoch'")
        if run_id is None:
            ctx = _train_context()
            run_id = ctx.get_experiment_name() if ctx is not None else ""
        self.model = model
        self.every = every
        self.unit = unit
        self.run_id = run_id
        self.source = source
        self.seed = seed
        self.replace = replace
        self.rank = world()[0]
        self.written: list[str] = []
        # Only rank 0 touches the store (other ranks never open it: no remote-FS calls there).
        self._store = CandidateStore(store_uri, create=True) if self.rank == 0 else None
        self._layout: Layout | None = None

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def due(self, *, step: int, epoch: float = 0.0) -> bool:
        """Whether the interval asks for a snapshot at this point (on every rank)."""
        return snapshot_due(step=step, epoch=epoch, every=self.every, unit=self.unit)

    def maybe_snapshot(self, *, step: int, epoch: float = 0.0, force: bool = False) -> str | None:
        """Snapshot when :meth:`due` (or ``force``); returns the name written on rank 0, else None.

        Call it on every rank (it is cheap and collective-free); only rank 0 writes.
        """
        if not (force or self.due(step=step, epoch=epoch)):
            return None
        return self.snapshot(step=step, epoch=epoch)

    def snapshot(self, *, step: int, epoch: float = 0.0) -> str | None:
        """Write the current parameters as candidate :func:`candidate_name` ``(step)`` (rank 0)."""
        if self._store is None:
            return None
        module = unwrap_model(self.model)
        if self._layout is None:
            self._layout = Layout.from_module(module)
        name = candidate_name(step)
        if name in self._store and not self.replace:
            return self._wrote(name)
        if name in self._store:
            owner = self._store.info(name).run_id
            if owner != self.run_id:
                raise ValueError(
                    f"candidate {name!r} in store {self._store.uri!r} belongs to run "
                    f"{owner!r}, not to this run {self.run_id!r}; use a new store (one store "
                    "per sampling run) or the same run_id to resume that run"
                )
        # overwrite=True is an atomic replace: a restarted run rewrites what it had written
        # after its last checkpoint (the same step, so the same name) instead of duplicating it.
        self._store.write(
            dict(module.named_parameters()),
            self._layout,
            step=step,
            epoch=float(epoch),
            source=self.source,
            seed=self.seed,
            run_id=self.run_id,
            name=name,
            overwrite=True,
        )
        return self._wrote(name)

    def _wrote(self, name: str) -> str:
        if name not in self.written:
            self.written.append(name)
        return name


# one writer per (model, store, run): the store is opened and the layout computed once
_WRITERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Snapshotter]] = (
    weakref.WeakKeyDictionary()
)


def snapshot(
    model: nn.Module,
    store_uri: str,
    *,
    step: int,
    epoch: float = 0.0,
    run_id: str | None = None,
    source: str = "snapshot",
    seed: int | None = None,
) -> str | None:
    """Write ``model``'s trainable parameters as candidate ``step{step:08d}`` of ``store_uri``.

    Call it on every rank (no collective); world rank 0 writes, the others return None. A model
    sharded with FSDP2 (DTensor parameters) is written shard by shard, without gathering it
    (:func:`snapshot_shards`, a collective).

    Args:
        model: the model being trained (a DDP wrapper is fine: its ``.module`` is stored).
        store_uri: the candidate store (local path or ``pyarrow.fs`` URI; created if missing).
        step: the global step: it names the candidate, so a replayed step overwrites it.
        epoch: completed epochs (fractional allowed), stored as metadata.
        run_id: tells this run's candidates from others' (a candidate of another run under the
            same name is refused); default: the Ray Train run name, ``""`` outside Ray Train.
        source, seed: metadata stored with the candidate.

    Returns:
        The candidate's name on rank 0, else None.
    """
    if is_sharded(model):  # FSDP2: every rank writes its rows (a collective)
        if run_id is None:
            ctx = _train_context()
            run_id = ctx.get_experiment_name() if ctx is not None else ""
        meta = {"epoch": epoch, "run_id": run_id, "source": source, "seed": seed}
        return snapshot_shards(model, store_uri, step=step, **meta)
    key = (store_uri, run_id, source, seed)
    writers = _WRITERS.setdefault(model, {})
    if key not in writers:
        writers[key] = Snapshotter(
            store_uri, model, every=1, run_id=run_id, source=source, seed=seed
        )
    return writers[key].snapshot(step=step, epoch=epoch)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (FSDP2's ``fully_shard``)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False  # nothing made a DTensor in this process
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def snapshot_shards(
    model: nn.Module,
    store_uri: str,
    *,
    step: int,
    epoch: float = 0.0,
    run_id: str = "",
    source: str = "snapshot",
    seed: int | None = None,
) -> str | None:
    """Write a sharded model's candidate ``step{step:08d}`` without gathering it: every rank
    writes its local shards (a part, :meth:`CandidateStore.write_part`), then, after a barrier,
    rank 0 commits the candidate (its manifest). Call it on every rank (a collective); returns
    the name on rank 0, else None. A step written again (a replayed step of a restarted run)
    replaces its parts and manifest; one of another run is refused."""
    import torch.distributed as dist

    shards = LocalShards.from_module(model)  # checks FSDP2's dim-0 placement
    layout, rank, size = shards.layout, shards.rank, shards.world
    store = CandidateStore(store_uri, create=True)
    name = candidate_name(step)
    if rank == 0 and name in store and store.info(name).run_id != run_id:
        raise ValueError(
            f"candidate {name!r} in store {store.uri!r} belongs to run "
            f"{store.info(name).run_id!r}, not to this run {run_id!r}; use a new store"
        )
    store.write_part(local_flat(model), layout, name=name, rank=rank, world=size, rows=shards.rows)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    meta = {"epoch": float(epoch), "source": source, "seed": seed, "run_id": run_id}
    return store.commit_parts(name, layout, size, step=step, overwrite=True, **meta)

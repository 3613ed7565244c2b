"""Snapshot candidates from inside a Ray Train ``train_loop_per_worker`` (yours or ours).

Only world rank 0 writes; the model is unwrapped from DDP first, so the stored layout is the
plain model's (``Layout.from_module(model)``: trainable parameters, no ``module.`` prefix).
Names derive from the global step (``step00001200``), so a run restarted from its last Ray Train
checkpoint rewrites the same names instead of adding duplicates: a candidate that already exists
and belongs to the same ``run_id`` is replaced atomically; one from another run is refused.

The public entry point is :func:`twa_ray.train.snapshot` (one call per snapshot, in any
``train_loop_per_worker``); :class:`Snapshotter` adds an interval (``every`` steps or epochs)::

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
from typing import Literal

import torch
from torch import nn

from twa_ray.core.layout import Layout
from twa_ray.store.store import CandidateStore

__all__ = ["Snapshotter", "candidate_name", "snapshot_due", "unwrap_model", "world_rank"]


def candidate_name(step: int) -> str:
    """The store name of the candidate taken after global step ``step`` (``step00001200``)."""
    return f"step{step:08d}"


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


def _train_context():
    """Ray Train's context inside a Train worker, ``None`` elsewhere (driver, plain script)."""
    try:
        import ray.train

        return ray.train.get_context()
    except (ImportError, RuntimeError):
        return None


def world_rank() -> int:
    """World rank in a Ray Train run, else the ``torch.distributed`` rank, else 0."""
    ctx = _train_context()
    if ctx is not None:
        return int(ctx.get_world_rank())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


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
        self.rank = world_rank()
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
        if name not in self.written:
            self.written.append(name)
        return name

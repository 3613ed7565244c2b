"""What both callbacks share: the snapshot schedule and the fit-end phase.

Snapshots go through the one writer of every trainer (:class:`~twa_ray.store.snapshots.Snapshotter`,
rank 0 writes, names ``step{:08d}``). Fit end on W ranks (``torch.distributed`` initialized,
W > 1): every rank builds the same subspace from the store and holds all of B ('replicate'
placement over the default group), so

.. math::
    a = \\tfrac1W \\textstyle\\sum_r B g^{(r)}, \\qquad \\alpha \\leftarrow \\mathrm{step}(\\alpha, a)

keeps alpha identical on every rank, as the project's coefficient group does; BatchNorm is
re-estimated over every rank's batches and the metrics are summed over the ranks
(:func:`~twa_ray.core.host.standard_evaluation`), as there too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from twa_ray.core.evaluate import evaluate_sharded
from twa_ray.core.host import build_loop, standard_evaluation
from twa_ray.core.layout import Layout
from twa_ray.core.loop import LoopHooks
from twa_ray.core.placement import place
from twa_ray.core.twa import TWA, TWAConfig, build_subspace
from twa_ray.store.snapshots import Snapshotter, candidate_name, candidate_step, snapshot_due, world
from twa_ray.store.store import CandidateStore

MODE_DEFAULT = "twa-v"
"""Both callbacks' default: alpha learned on held-out data (the validation / eval dataloader)."""


@dataclass
class Snapshots:
    """Candidates written to ``store`` at a schedule: every ``every_n_steps`` optimizer steps or
    every ``every_n_epochs`` epochs. Rank 0 writes; a step already taken (in :attr:`names`, under
    any naming scheme) or already in the store is not written again, so a resumed run picks up
    where it stopped."""

    store: str
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    names: list[str] = field(default_factory=list)
    _writer: Snapshotter | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.every_n_steps is None) == (self.every_n_epochs is None):
            raise ValueError(
                f"every_n_steps={self.every_n_steps}, every_n_epochs={self.every_n_epochs}: "
                "give exactly one of them"
            )
        n = self.every_n_steps or self.every_n_epochs
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"snapshot interval {n!r}: must be an int >= 1")

    def due(self, *, step: int, epoch_end: int | None = None) -> bool:
        """Whether a snapshot is due after optimizer step ``step`` (``epoch_end``: after that
        many finished epochs)."""
        if epoch_end is None:
            n, unit, epoch = self.every_n_steps, "step", 0.0
        else:
            n, unit, epoch = self.every_n_epochs, "epoch", float(epoch_end)
        return n is not None and snapshot_due(step=step, epoch=epoch, every=n, unit=unit)  # type: ignore[arg-type]

    def take(self, model: nn.Module, *, step: int, epoch: float) -> None:
        """Store the trainable parameters of ``model`` as candidate :func:`candidate_name`."""
        if any(candidate_step(n) == step for n in self.names):
            return
        if self._writer is None or self._writer.model is not model:
            self._writer = Snapshotter(self.store, model, every=1, replace=False)
        self._writer.snapshot(step=step, epoch=epoch)
        self.names.append(candidate_name(step))

    def state_dict(self) -> dict[str, Any]:
        return {"store": self.store, "names": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names = list(state["names"])


def refuse_sharded(what: str | None, model: nn.Module | None = None) -> None:
    """One clear error when training shards the model (``what`` names the strategy, or a
    parameter of ``model`` is a DTensor): the callbacks snapshot and learn on full parameters."""
    if what is None and model is not None:
        what = next(
            (
                f"parameter {n!r} is a DTensor"
                for n, p in model.named_parameters()
                if hasattr(p, "to_local")
            ),
            None,
        )
    if what is not None:
        raise ValueError(
            f"TWACallback does not support sharded models yet ({what}); train with a "
            "data-parallel strategy (ddp), or learn on the shards with "
            "twa_ray.core.sharded_twa.ShardedTWA"
        )


def schedule(
    store: str | None,
    *,
    every_n_steps: int | None,
    every_n_epochs: int | None,
    sample_frac: float | None,
    mode: str,
) -> Snapshots:
    """Check a callback's options; its snapshot schedule (every epoch unless one is given)."""
    if mode not in ("twa-t", "twa-v"):
        raise ValueError(f"mode={mode!r}: use 'twa-t' or 'twa-v'")
    if sample_frac is not None and not 0 < sample_frac <= 1:
        raise ValueError(f"sample_frac={sample_frac}: must lie in (0, 1]")
    if every_n_steps is None and every_n_epochs is None:
        every_n_epochs = 1
    return Snapshots(store or "", every_n_steps=every_n_steps, every_n_epochs=every_n_epochs)


def learn(
    model: nn.Module,
    snapshots: Snapshots,
    config: TWAConfig,
    mode: str,
    *,
    train: Iterable[Any],
    val: Iterable[Any] | None,
    loss_fn: Callable[..., torch.Tensor],
) -> tuple[TWA, dict[str, float]]:
    """Learn alpha over the snapshots (``mode`` 'twa-t': on ``train``; 'twa-v': on ``val``),
    leave ``theta(alpha)`` in ``model`` with BatchNorm re-estimated on ``train``.

    Returns the core TWA object and the metrics of the model as it was (``final``), of the
    SWA point (``swa``, alpha_0) and of TWA (``twa``) on ``val`` (none without it).
    """
    if len(snapshots.names) < 2:
        raise ValueError(
            f"TWA needs at least 2 candidates, the run stored {len(snapshots.names)} in "
            f"{snapshots.store!r}; snapshot more often (every_n_steps/every_n_epochs) or train longer"
        )
    rank, size = world()
    if size > 1:
        dist.barrier()  # rank 0's last write is in place before anyone reads
    device = next(p for p in model.parameters() if p.requires_grad).device
    metrics: dict[str, float] = {}

    def record(tag: str, evaluated: dict[str, Any]) -> None:
        if "val_loss" in evaluated:
            metrics.update({f"twa/{tag}_{k}": evaluated[f"val_{k}"] for k in ("loss", "acc")})

    if val is not None:
        r = evaluate_sharded(model, val, device=device, loss_fn=loss_fn)
        record("final", {"val_loss": r.loss, "val_acc": r.acc})
    store = CandidateStore(snapshots.store)

    def stream() -> Iterator[torch.Tensor]:
        return (store.read(n) for n in snapshots.names)

    subspace = build_subspace(stream, Layout.from_module(model), config)
    twa = TWA(
        model, place(subspace, "replicate", rank=rank, world=size), config=config, loss_fn=loss_fn
    )
    evaluation = standard_evaluation(train, {"val": val})
    record("swa", evaluation(twa))  # theta(alpha_0): the SWA point
    loop = build_loop(twa, mode[-1], train, val, hooks=LoopHooks(evaluate=evaluation)).run()
    record("twa", loop.final)
    metrics["twa/num_candidates"] = float(len(snapshots.names))
    return twa, metrics

"""What both callbacks share: the extra check, the snapshot schedule and the fit-end phase.

Fit end on W ranks (``torch.distributed`` initialized, W > 1): every rank builds the same
subspace from the store and holds all of B ('replicate' placement over the default group), so

.. math::
    a = \\tfrac1W \\textstyle\\sum_r B g^{(r)}, \\qquad \\alpha \\leftarrow \\mathrm{step}(\\alpha, a)

keeps alpha identical on every rank, as the project's coefficient group does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from twa_ray.core.evaluate import EvalResult, evaluate
from twa_ray.core.layout import Layout
from twa_ray.core.placement import place
from twa_ray.core.twa import TWA, TWAConfig, build_subspace
from twa_ray.store.store import CandidateStore

__all__ = ["Snapshots", "learn", "require", "world"]


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or one ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module} is not installed; install the extra: pip install 'twa_ray[{extra}]'"
        ) from None


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


@dataclass
class Snapshots:
    """Candidates written to ``store`` at a schedule: every ``every_n_steps`` optimizer steps or
    every ``every_n_epochs`` epochs. Rank 0 writes; a step already in the store is not written
    again (idempotent by global step), so a resumed run picks up where it stopped."""

    store: str
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    names: list[str] = field(default_factory=list)

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
            return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
        return self.every_n_epochs is not None and epoch_end % self.every_n_epochs == 0

    def take(self, model: nn.Module, *, step: int, epoch: float) -> None:
        """Store the trainable parameters of ``model`` as candidate ``step-<step>``."""
        name = f"step-{step:09d}"
        if name in self.names:
            return
        if world()[0] == 0:
            store = CandidateStore(self.store, create=True)
            if name not in store:
                store.write(
                    {n: p.detach() for n, p in model.named_parameters()},
                    Layout.from_module(model),
                    step=step,
                    epoch=epoch,
                    name=name,
                )
        self.names.append(name)

    def state_dict(self) -> dict[str, Any]:
        return {"store": self.store, "names": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names = list(state["names"])


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


def _evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device,
    loss_fn: Callable[..., torch.Tensor],
) -> EvalResult:
    """Loss and accuracy summed over every rank's part of ``loader``."""
    r = evaluate(model, loader, device=device, loss_fn=loss_fn)
    if world()[1] == 1:
        return r
    sums = torch.tensor([r.loss_sum, r.correct, r.count], dtype=torch.float64)
    dist.all_reduce(sums)
    return EvalResult(float(sums[0]), int(sums[1]), int(sums[2]))


def learn(
    model: nn.Module,
    snapshots: Snapshots,
    config: TWAConfig,
    *,
    loader: Iterable[Any],
    bn_loader: Iterable[Any],
    eval_loader: Iterable[Any] | None,
    loss_fn: Callable[..., torch.Tensor],
) -> tuple[TWA, dict[str, float]]:
    """Learn alpha over the snapshots on ``loader`` (TWA-t: train data; TWA-v: held-out data),
    leave ``theta(alpha)`` in ``model`` with BatchNorm re-estimated on ``bn_loader``.

    Returns the core TWA object and the metrics of the model as it was (``final``), of the
    SWA point (``swa``, alpha_0) and of TWA (``twa``) on ``eval_loader`` (none without it).
    """
    if len(snapshots.names) < 2:
        raise ValueError(
            f"TWA needs at least 2 candidates, the run stored {len(snapshots.names)} in "
            f"{snapshots.store!r}; snapshot more often (every_n_steps/every_n_epochs) or train longer"
        )
    barrier()  # rank 0's last write is in place before anyone reads
    device = next(p for p in model.parameters() if p.requires_grad).device
    metrics: dict[str, float] = {}

    def measure(tag: str) -> None:
        if eval_loader is not None:
            r = _evaluate(model, eval_loader, device, loss_fn)
            metrics.update({f"twa/{tag}_loss": r.loss, f"twa/{tag}_acc": r.acc})

    measure("final")
    store = CandidateStore(snapshots.store)

    def stream() -> Iterator[torch.Tensor]:
        return (store.read(n) for n in snapshots.names)

    rank, size = world()
    subspace = build_subspace(stream, Layout.from_module(model), config)
    twa = TWA(
        model, place(subspace, "replicate", rank=rank, world=size), config=config, loss_fn=loss_fn
    )
    twa.update_bn(bn_loader)  # theta(alpha_0): the SWA point
    measure("swa")
    twa.fit(loader)
    twa.update_bn(bn_loader)
    measure("twa")
    metrics["twa/num_candidates"] = float(len(snapshots.names))
    return twa, metrics

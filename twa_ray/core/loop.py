"""The coefficient loop: one definition of a step, a pass and an epoch for every host.

The library's :meth:`TWA.fit <twa_ray.core.twa.TWA.fit>`, ``twa-ray average``, a Tune trial,
the Ray Train coefficient group and the Lightning / Hugging Face callbacks all run
:class:`CoefficientLoop` (built by :func:`twa_ray.core.host.build_loop`); what differs by host
comes in through one :class:`LoopHooks` (the workers' sums, checkpoints, reports, evaluation,
stop).

**Step**: one coefficient update; each of the W workers takes one batch of ``batch_size // W``
examples (W = 1 in one process), ``a`` is averaged over the workers by the
:class:`~twa_ray.core.placement.Placement`:

.. math::
    a = \\tfrac1W \\textstyle\\sum_r B\\,\\nabla_\\theta \\ell(\\theta(\\alpha); \\text{batch}_r), \\qquad
    \\alpha \\leftarrow \\mathrm{step}(\\alpha, a, \\eta_t), \\qquad
    \\theta = o + \\textstyle\\sum \\alpha B

**Epoch** (the budget unit, whatever split the loop fits on: TWA-v takes as many steps as TWA-t,
cycling its smaller held-out split):

.. math::
    S_\\text{epoch} = \\max\\big(1, \\lfloor \\lceil N_\\text{train} / W \\rceil / \\lfloor b / W \\rfloor \\rfloor\\big),
    \\qquad T = \\max(1, \\mathrm{round}(\\text{epochs} \\cdot S_\\text{epoch}))

with b the global batch (:func:`steps_per_epoch`); the schedule spans the T steps.

**Pass**: one sweep of the fit split (train for TWA-t, held-out val for TWA-v). With
:class:`ShuffledBatches` pass p is rank r's share of ``DistributedSampler(seed).set_epoch(p)`` in
batches of ``b // W``, the last partial batch dropped; the data order is a function of
(seed, pass, step), so a resumed loop replays it exactly.

>>> loop = CoefficientLoop(twa, ShuffledBatches(train, 128, seed=0),            # doctest: +SKIP
...                        total_steps=total_steps(3.0, steps_per_epoch(len(train), 128)),
...                        steps_per_epoch=steps_per_epoch(len(train), 128))
>>> loop.run().history[-1]["loss"]                                             # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from twa_ray.core.checks import check_coefficient_step

if TYPE_CHECKING:
    from twa_ray.core.twa import TWA

__all__ = [
    "BatchSource",
    "CoeffState",
    "CoefficientLoop",
    "LoaderBatches",
    "LoopHooks",
    "ShuffledBatches",
    "steps_per_epoch",
    "total_steps",
]

log = logging.getLogger(__name__)


def steps_per_epoch(num_examples: int, batch_size: int, world: int = 1) -> int:
    """Steps of one epoch over ``num_examples`` training examples: each of ``world`` workers
    walks its ``ceil(N / W)`` examples in whole batches of ``batch_size // world``.

    >>> steps_per_epoch(1000, 128), steps_per_epoch(1000, 128, world=3)
    (7, 7)
    """
    return max(1, math.ceil(num_examples / world) // max(1, batch_size // world))


def total_steps(epochs: float, per_epoch: int) -> int:
    """``max(1, round(epochs * per_epoch))``: the steps of the whole schedule."""
    return max(1, round(epochs * per_epoch))


class BatchSource(Protocol):
    """Where the loop's batches come from: pass ``p`` from its step ``skip`` on."""

    steps_per_pass: int | None

    def batches(self, pass_index: int, skip: int) -> Iterable[Any]: ...


class ShuffledBatches:
    """This worker's batches of a seeded shuffle of ``dataset``, replayable by (pass, step).

    Pass p: ``DistributedSampler(dataset, W, rank, shuffle=True, seed).set_epoch(p)`` (padded to
    ``ceil(N / W)`` indices per rank), in batches of ``batch_size // W``, drop_last (equal batches
    on every rank). ``loader_options`` go to the ``DataLoader`` (workers, pinned memory).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        split: str = "fit",
        loader_options: Mapping[str, Any] | None = None,
    ) -> None:
        from torch.utils.data.distributed import DistributedSampler

        self.dataset = dataset
        self.per_worker = batch_size // world
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed
        )
        self.loader_options = dict(loader_options or {})
        self.steps_per_pass: int | None = len(self.sampler) // max(self.per_worker, 1)
        if self.per_worker < 1 or self.steps_per_pass == 0:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {len(dataset)} examples of the {split} split "
                f"(over {world} workers); lower batch_size"
            )

    def batches(self, pass_index: int, skip: int) -> Iterable[Any]:
        from torch.utils.data import DataLoader

        self.sampler.set_epoch(pass_index)
        order = list(self.sampler)[skip * self.per_worker :]
        return DataLoader(
            self.dataset,
            batch_size=self.per_worker,
            sampler=order,
            drop_last=True,
            **self.loader_options,
        )


class LoaderBatches:
    """A re-iterable loader of the user's (a DataLoader, a list of batches): every pass iterates
    it again (its own shuffling, if any, decides the order). ``steps_per_pass``: ``len(loader)``,
    or None when it has no length (passes then end only with the loop)."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        try:
            self.steps_per_pass: int | None = len(loader)  # type: ignore[arg-type]
        except TypeError:
            self.steps_per_pass = None

    def batches(self, pass_index: int, skip: int) -> Iterable[Any]:
        return itertools.islice(self.loader, skip, None)


@dataclass
class CoeffState:
    """What a host checkpoints to resume the loop (plain types: ``torch.load(weights_only=True)``)."""

    twa: dict[str, Any]
    """:meth:`TWA.state_dict`: alpha, optimizer, schedule, step."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per finished pass over the fit split."""
    pass_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    """(3,) float64 loss sum, correct, count of the current pass, all workers."""

    def to_dict(self) -> dict[str, Any]:
        return {"twa": self.twa, "history": self.history, "pass_sums": self.pass_sums}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoeffState:
        return cls(twa=d["twa"], history=list(d["history"]), pass_sums=d["pass_sums"])


Record = dict[str, Any]


@dataclass(frozen=True)
class LoopHooks:
    """What a host plugs into the loop (every hook optional)."""

    all_reduce: Callable[[torch.Tensor], Any] | None = None
    """Sums a float64 tensor over the workers in place (default: one worker)."""
    on_step: Callable[[int, float], None] | None = None
    """``(step, loss)`` after every step (this worker's mean loss of the batch)."""
    on_sync: Callable[[CoefficientLoop, Record], None] | None = None
    """``(loop, record)`` at each sync point; a host checkpoints :meth:`CoefficientLoop.state`."""
    evaluate: Callable[[TWA], dict[str, Any]] | None = None
    """``twa -> metrics``: BN re-estimation and evaluation at the current weights; run after the
    last step (:attr:`CoefficientLoop.final`) and, with ``on_epoch``, after every epoch."""
    on_epoch: Callable[[CoefficientLoop, Record], None] | None = None
    """``(loop, metrics)`` after every epoch (and the last step): ``evaluate``'s metrics plus
    ``epoch``, ``step``, ``loss`` and ``acc`` of the epoch's batches."""
    should_stop: Callable[[], bool] | None = None
    """Checked after every step: True ends the loop early (resumable)."""


class CoefficientLoop:
    """``total_steps`` coefficient steps of ``twa`` on ``data``; see the module docstring.

    Args:
        twa: the engine (its placement averages ``a`` over the workers).
        data: a :class:`BatchSource` (:class:`ShuffledBatches`, :class:`LoaderBatches`).
        total_steps: where the loop stops (``twa.step_count`` counts from 0 over the schedule).
        steps_per_epoch: the budget unit (:func:`steps_per_epoch`), for records and ``on_epoch``.
        hooks: the host's :class:`LoopHooks`.
        sync_every: also combine the workers' sums and call ``on_sync`` every this many steps
            (pass ends and the last step always do).
        labels: fields put first in every record (e.g. ``{"mode": "v"}``).
        progress: log one line per pass (the host sets it on one rank).
    """

    def __init__(
        self,
        twa: TWA,
        data: BatchSource,
        *,
        total_steps: int,
        steps_per_epoch: int,
        hooks: LoopHooks | None = None,
        sync_every: int | None = None,
        labels: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        if total_steps < 1 or steps_per_epoch < 1:
            raise ValueError(
                f"total_steps={total_steps}, steps_per_epoch={steps_per_epoch}: need >= 1"
            )
        self.twa, self.data = twa, data
        self.total, self.steps_per_epoch = int(total_steps), int(steps_per_epoch)
        self.steps_per_pass = data.steps_per_pass
        self.sync_every = sync_every
        self.hooks = hooks = hooks or LoopHooks()
        self.all_reduce = hooks.all_reduce
        self.on_step, self.on_sync, self.on_epoch = hooks.on_step, hooks.on_sync, hooks.on_epoch
        self.evaluate, self.should_stop = hooks.evaluate, hooks.should_stop
        self.labels = dict(labels or {})
        self.progress = progress
        self.history: list[Record] = []
        # loss sum, correct, count: of this worker since the last sync, of all workers in this
        # pass and in this epoch (on the twa device: nccl reduces there)
        self._local = torch.zeros(3, dtype=torch.float64, device=twa.device)
        self.pass_sums = torch.zeros_like(self._local)
        self._epoch_sums = torch.zeros_like(self._local)
        self._last_eval: tuple[int, dict[str, Any]] | None = None
        self.final: dict[str, Any] = {}
        self.choices: dict[str, Any] = {}
        """What :func:`~twa_ray.core.start.run_chosen` chose (start, its scores, kept epoch)."""
        self.train_time_s = 0.0

    # -- resume ----------------------------------------------------------------------------
    def state(self) -> CoeffState:
        """The resume state (after a sync: the pass sums of all workers)."""
        return CoeffState(self.twa.state_dict(), list(self.history), self.pass_sums.cpu())

    def load_state(self, state: CoeffState) -> None:
        """Continue from ``state`` (the optimizer and schedule are rebuilt for ``total_steps``)."""
        self.twa.load_state_dict(state.twa, total_steps=self.total)
        self.history = list(state.history)
        self.pass_sums = state.pass_sums.double().to(self.twa.device)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> CoefficientLoop:
        """Step until ``total_steps`` (or ``should_stop``), then ``evaluate``; returns self."""
        twa = self.twa
        if twa.optimizer is None:
            twa.start(self.total)
        t0 = time.perf_counter()
        passes = 0  # sources without a length: passes counted here
        while twa.step_count < self.total:
            spp = self.steps_per_pass
            p, skip = divmod(twa.step_count, spp) if spp else (passes, 0)
            stepped = False
            for batch in self.data.batches(p, skip):
                stepped = True
                if self._step(batch):
                    break
            if not stepped:
                raise ValueError("the coefficient loop's data yielded no batch")
            passes += 1
            if self.should_stop is not None and self.should_stop():
                break
        self.train_time_s = time.perf_counter() - t0
        if self.evaluate is not None and twa.step_count >= self.total:
            self.final = self._evaluated()
        return self

    def _step(self, batch: Any) -> bool:
        """One step and its bookkeeping; True when the loop must leave the pass."""
        twa = self.twa
        a, loss_sum, correct, count = twa.coefficient_grad(batch)
        lr = twa.optimizer.param_groups[0]["lr"]  # type: ignore[union-attr]
        twa.apply_(a)
        step = twa.step_count
        check_coefficient_step(
            a,
            twa.alpha,
            loss_sum / max(count, 1),
            step=step,
            epoch=step / self.steps_per_epoch,
            lr=lr,
        )
        self._local += torch.tensor(
            [loss_sum, correct, count], dtype=torch.float64, device=twa.device
        )
        if self.on_step is not None:
            self.on_step(step, loss_sum / max(count, 1))
        spp = self.steps_per_pass
        pass_end = bool(spp and step % spp == 0) or step == self.total
        epoch_end = self.on_epoch is not None and (
            step % self.steps_per_epoch == 0 or step == self.total
        )
        sync = pass_end or bool(self.sync_every and step % self.sync_every == 0)
        if sync or epoch_end:
            self._reduce()
        if sync:
            self._sync(step, pass_end)
        if epoch_end:
            self._epoch_end(step)
        stop = self.should_stop is not None and self.should_stop()
        return step >= self.total or stop

    def _reduce(self) -> None:
        """Add every worker's sums since the last reduce to the pass and epoch sums."""
        if self.all_reduce is not None:
            self.all_reduce(self._local)
        self.pass_sums += self._local
        self._epoch_sums += self._local
        self._local.zero_()

    def _record(self, step: int, sums: torch.Tensor) -> Record:
        spp = self.steps_per_pass
        loss, acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        lr = self.twa.optimizer.param_groups[0]["lr"]  # type: ignore[union-attr]
        return {
            **self.labels,
            "epoch": step / self.steps_per_epoch,
            "step": step,
            "pass": math.ceil(step / spp) if spp else None,
            "lr": lr,
            "loss": loss,
            "acc": acc,
        }

    def _sync(self, step: int, pass_end: bool) -> None:
        record = self._record(step, self.pass_sums)
        if pass_end:
            self.history.append(record)
            self.pass_sums.zero_()
            if self.progress:
                tag = "-".join(str(v) for v in ("twa", *self.labels.values()))
                log.info(
                    "%s epoch %.2f step %d/%d: loss %.4f acc %.2f%% lr %.4g",
                    tag,
                    record["epoch"],
                    step,
                    self.total,
                    record["loss"],
                    100 * record["acc"],
                    record["lr"],
                )
        if self.on_sync is not None:
            self.on_sync(self, record)

    def _epoch_end(self, step: int) -> None:
        record = self._record(step, self._epoch_sums)
        self._epoch_sums.zero_()
        metrics = self._evaluated() if self.evaluate is not None else {}
        assert self.on_epoch is not None
        self.on_epoch(self, {**record, **metrics})

    def _evaluated(self) -> dict[str, Any]:
        """``evaluate`` at the current step, once per step."""
        assert self.evaluate is not None
        step = self.twa.step_count
        if self._last_eval is None or self._last_eval[0] != step:
            self._last_eval = (step, self.evaluate(self.twa))
        return self._last_eval[1]

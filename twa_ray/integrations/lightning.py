"""TWA as a Lightning callback: candidates while you train, the learned average at fit end.

>>> trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[TWACallback("runs/cands",
...                                      every_n_epochs=1, sample_frac=0.5)])  # doctest: +SKIP

The LightningModule's ``forward(x)`` gives logits and ``loss_fn(logits, y)`` (cross entropy by
default; it must take ``reduction=``) the loss of an ``(x, y)`` batch. Under ``ddp`` (or Ray
Train's ``RayDDPStrategy``) every rank runs the coefficient phase on its part of the data and
the ranks average their coefficient gradients, re-estimate BatchNorm over all ranks' batches
and sum the metrics over the ranks (see :mod:`twa_ray.integrations._common`). Sharding
strategies (``FSDPStrategy``, ``ModelParallelStrategy``) are refused at ``setup``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from twa_ray.core.twa import TWAConfig
from twa_ray.extras import require
from twa_ray.integrations._common import MODE_DEFAULT, learn, refuse_sharded, schedule

pl = require("lightning.pytorch", "lightning")

__all__ = ["TWACallback"]


class TWACallback(pl.Callback):
    """Snapshot candidates during ``fit`` and replace the weights by their TWA at its end.

    Args:
        store: the candidate store (local path or ``pyarrow.fs`` URI); default
            ``<trainer.default_root_dir>/twa_candidates``.
        every_n_steps / every_n_epochs: the snapshot interval (one of them; default 1 epoch).
        sample_frac: stop training after this fraction of ``max_epochs`` ("finish early");
            ``None`` trains all epochs.
        mode: ``"twa-v"`` (default) learns alpha on the val dataloader, ``"twa-t"`` on the train
            one.
        config: the coefficient phase (:class:`~twa_ray.core.twa.TWAConfig`).
        loss_fn: ``loss_fn(logits, y, reduction=...)`` of the module's outputs.

    After ``fit``, :attr:`metrics` holds the val loss/accuracy of the final model, of SWA and of
    TWA over the same candidates (also sent to ``trainer.logger``), :attr:`twa` the core object.
    """

    def __init__(
        self,
        store: str | None = None,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        sample_frac: float | None = None,
        mode: Literal["twa-t", "twa-v"] = MODE_DEFAULT,
        config: TWAConfig | None = None,
        loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    ) -> None:
        self.snapshots = schedule(
            store,
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            sample_frac=sample_frac,
            mode=mode,
        )
        self.sample_frac = sample_frac
        self.mode = mode
        self.config = config or TWAConfig()
        self.loss_fn = loss_fn
        self.metrics: dict[str, float] = {}
        self.twa: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            refuse_sharded(f"strategy {type(trainer.strategy).__name__}")
        if not self.snapshots.store:
            self.snapshots.store = f"{trainer.default_root_dir}/twa_candidates"

    # -- sampling ----------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.snapshots.due(step=trainer.global_step):
            self.snapshots.take(pl_module, step=trainer.global_step, epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        done = trainer.current_epoch + 1
        if self.snapshots.due(step=trainer.global_step, epoch_end=done):
            self.snapshots.take(pl_module, step=trainer.global_step, epoch=float(done))
        if self.sample_frac is not None and trainer.max_epochs and trainer.max_epochs > 0:
            if done >= math.ceil(self.sample_frac * trainer.max_epochs):
                trainer.should_stop = True  # the same on every rank: a function of the epoch

    # -- the coefficient phase -----------------------------------------------------------------
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        train = trainer.train_dataloader
        val = trainer.val_dataloaders
        val = val[0] if isinstance(val, (list, tuple)) and val else val
        if self.mode == "twa-v" and val is None:
            raise ValueError(
                "mode='twa-v' needs a val dataloader: pass val_dataloaders to fit, or use "
                "mode='twa-t'"
            )
        self.twa, self.metrics = learn(
            pl_module,
            self.snapshots,
            self.config,
            self.mode,
            train=train,
            val=val,
            loss_fn=self.loss_fn,
        )
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.metrics, step=trainer.global_step)

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "snapshots": self.snapshots.state_dict(),
            "twa": self.twa.state_dict() if self.twa else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots.store = self.snapshots.store or state_dict["snapshots"]["store"]
        self.snapshots.load_state_dict(state_dict["snapshots"])


def __getattr__(name: str) -> Any:
    if name == "TWA":  # the name before 0.2, kept for old scripts
        warnings.warn(
            "twa_ray.integrations.lightning.TWA is deprecated; use TWACallback",
            DeprecationWarning,
            stacklevel=2,
        )
        return TWACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

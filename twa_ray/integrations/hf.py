"""TWA as a Hugging Face ``Trainer`` callback: candidates while it trains, the learned average at
the end, written with ``save_pretrained``.

>>> trainer = transformers.Trainer(model, args, train_dataset=train, eval_dataset=val,
...                                callbacks=[TWACallback(every_n_epochs=1, sample_frac=0.5)])  # doctest: +SKIP

Candidates are the model's trainable named parameters (a tied weight is one parameter, stored
once; frozen parameters stay out of the subspace). ``loss_fn(logits, labels)`` is the loss of the
model's logits (cross entropy by default: sequence and image classification). TWA-v uses the
eval dataloader, so set ``eval_strategy`` ('epoch' or 'steps') with an ``eval_dataset``. Under Ray
Train (``RayTrainReportCallback``) or ``torchrun`` every rank runs the coefficient phase on its
part of the data and the ranks average their coefficient gradients, re-estimate BatchNorm over
all ranks' batches and sum the metrics over the ranks. FSDP (``fsdp`` in the training arguments
or ``accelerate launch`` with an FSDP config) is refused when training begins.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any, Literal

import torch
import torch.nn.functional as F

from twa_ray.core.twa import TWAConfig
from twa_ray.extras import require
from twa_ray.integrations._common import MODE_DEFAULT, learn, refuse_sharded, schedule
from twa_ray.store.hf import HFLogits, save_folder

transformers = require("transformers", "hf")

__all__ = ["TWACallback"]


class _Batches:
    """A dataloader of ``{..., "labels"}`` dicts seen as ``(inputs, labels)`` batches (the
    inputs a ``BatchEncoding``, which moves to a device with ``.to``)."""

    def __init__(self, loader: Iterable[Mapping[str, Any]]) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for batch in self.loader:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            yield transformers.BatchEncoding(inputs), batch["labels"]


class TWACallback(transformers.TrainerCallback, transformers.trainer_callback.ExportableState):
    """Snapshot candidates during ``Trainer.train`` and replace the weights by their TWA at its end.

    Args:
        store: the candidate store (local path or ``pyarrow.fs`` URI); default
            ``<output_dir>/twa_candidates``.
        every_n_steps / every_n_epochs: the snapshot interval (one of them; default 1 epoch).
        sample_frac: stop after this fraction of ``num_train_epochs`` ("finish early").
        mode: ``"twa-v"`` (default) learns alpha on the eval dataloader, ``"twa-t"`` on the
            train one.
        config: the coefficient phase (a :class:`~twa_ray.core.twa.TWAConfig` or its dict).
        save_dir: where the averaged model is written (``save_pretrained``); default
            ``<output_dir>/twa``.

    After training, :attr:`metrics` holds the eval loss/accuracy of the final model, of SWA and
    of TWA over the same candidates (also appended to ``state.log_history``).
    """

    def __init__(
        self,
        store: str | None = None,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        sample_frac: float | None = None,
        mode: Literal["twa-t", "twa-v"] = MODE_DEFAULT,
        config: TWAConfig | Mapping[str, Any] | None = None,
        save_dir: str | None = None,
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
        self.config = config if isinstance(config, TWAConfig) else TWAConfig.from_dict(config or {})
        self.save_dir = save_dir
        self.loss_fn = loss_fn
        self.metrics: dict[str, float] = {}
        self.twa: Any = None

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        launched = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        refuse_sharded("FSDP (accelerate)" if args.fsdp or launched else None, model)
        if not self.snapshots.store:
            self.snapshots.store = os.path.join(args.output_dir, "twa_candidates")

    # -- sampling ----------------------------------------------------------------------------
    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        if self.snapshots.due(step=state.global_step):
            self.snapshots.take(model, step=state.global_step, epoch=float(state.epoch or 0))

    def on_epoch_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        done = round(state.epoch or 0)
        if self.snapshots.due(step=state.global_step, epoch_end=done):
            self.snapshots.take(model, step=state.global_step, epoch=float(done))
        if self.sample_frac is not None and done >= math.ceil(
            self.sample_frac * args.num_train_epochs
        ):
            control.should_training_stop = True

    # -- the coefficient phase -----------------------------------------------------------------
    def on_train_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        train_dataloader: Any = None,
        eval_dataloader: Any = None,
        **kw: Any,
    ) -> None:
        if self.mode == "twa-v" and eval_dataloader is None:
            raise ValueError(
                "mode='twa-v' needs the eval dataloader: give the Trainer an eval_dataset and "
                "eval_strategy='epoch' (or 'steps'), or use mode='twa-t'"
            )
        train = _Batches(train_dataloader)
        val = _Batches(eval_dataloader) if eval_dataloader is not None else None
        self.twa, self.metrics = learn(
            HFLogits(model),
            self.snapshots,
            self.config,
            self.mode,
            train=train,
            val=val,
            loss_fn=self.loss_fn,
        )
        state.log_history.append({**self.metrics, "step": state.global_step})
        if state.is_world_process_zero:
            save_folder(model, self.save_dir or os.path.join(args.output_dir, "twa"))

    # -- resume (Trainer checkpoints keep ExportableState callbacks) ----------------------------
    def state(self) -> dict[str, Any]:
        s = self.snapshots
        return {
            "args": {
                "store": s.store,
                "every_n_steps": s.every_n_steps,
                "every_n_epochs": s.every_n_epochs,
                "sample_frac": self.sample_frac,
                "mode": self.mode,
                "config": asdict(self.config),
                "save_dir": self.save_dir,
            },
            "attributes": {"candidate_names": list(s.names)},
        }

    @property
    def candidate_names(self) -> list[str]:
        return self.snapshots.names

    @candidate_names.setter
    def candidate_names(self, names: list[str]) -> None:
        self.snapshots.names = list(names)

    def state_dict(self) -> dict[str, Any]:
        return self.state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.candidate_names = state["attributes"]["candidate_names"]

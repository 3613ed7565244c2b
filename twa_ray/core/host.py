"""One way to host the coefficient loop: (engine, mode, splits, world) -> a ready loop.

Every host (``twa-ray average``, a Tune trial, the Ray Train coefficient group, the Lightning
and Hugging Face callbacks) builds its :class:`~twa_ray.core.loop.CoefficientLoop` here:

- **fit split**: TWA-t (``mode='t'``) fits alpha on the train split, TWA-v (``'v'``) on held-out
  data;
- **epoch**: on datasets, the budget unit is the *train* split in both modes,
  :math:`S_\\text{epoch} = \\lfloor \\lceil N_\\text{train}/W \\rceil / \\lfloor b/W \\rfloor \\rfloor`
  (TWA-v takes as many steps as TWA-t, cycling its smaller split), over
  :math:`T = \\mathrm{round}(\\text{epochs} \\cdot S_\\text{epoch})` steps, in the seeded order of
  :class:`~twa_ray.core.loop.ShuffledBatches` with the global batch
  :math:`b = \\min(b, N_\\text{fit})` (a held-out split smaller than a batch is one batch); on
  a user's loaders, one pass of the fit loader in its own order;
- **evaluation** (:func:`standard_evaluation`): BatchNorm re-estimated over every worker's
  batches (:func:`~twa_ray.core.bn.reestimate_bn`), then loss and accuracy summed over every
  worker's part of each evaluation split (:func:`~twa_ray.core.evaluate.evaluate_sharded`).

>>> loop = build_loop(twa, "v", train, val, batch_size=128, seed=0,        # doctest: +SKIP
...                   hooks=LoopHooks(evaluate=standard_evaluation(bn, {"test": test})))
>>> loop.run().final["test_acc"]                                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from twa_ray.core.bn import reestimate_bn
from twa_ray.core.evaluate import evaluate_sharded
from twa_ray.core.loop import (
    BatchSource,
    CoefficientLoop,
    LoaderBatches,
    LoopHooks,
    ShuffledBatches,
    steps_per_epoch,
    total_steps,
)

if TYPE_CHECKING:
    from twa_ray.core.twa import TWA

__all__ = ["MODES", "build_loop", "standard_evaluation"]

MODES = ("t", "v")
"""TWA-t: alpha fitted on the train split; TWA-v: on held-out data."""


def build_loop(
    twa: TWA,
    mode: str,
    train: Any,
    held_out: Any,
    *,
    batch_size: int | None = None,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    loader_options: Mapping[str, Any] | None = None,
    hooks: LoopHooks | None = None,
    **options: Any,
) -> CoefficientLoop:
    """The loop of ``twa`` for ``mode`` over ``twa.config.epochs`` epochs (module docstring).

    Args:
        train, held_out: datasets (with ``batch_size``: this worker's seeded share of the
            global batch) or, with ``batch_size=None``, re-iterable loaders of batches
            (``held_out`` may be None in TWA-t).
        rank, world: this worker and the number of workers (their ``a`` and sums are combined by
            the placement and ``hooks.all_reduce``).
        options: the loop's ``sync_every``, ``labels``, ``progress``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    fit, split = (train, "train") if mode == "t" else (held_out, "val")
    if fit is None:
        raise ValueError(f"TWA-{mode} needs {split} data")
    data: BatchSource
    if batch_size is None:
        data = LoaderBatches(fit)
        per_epoch = data.steps_per_pass
        if not per_epoch:
            raise ValueError(f"the {split} loader has no length; give a loader with len()")
    else:
        data = ShuffledBatches(
            fit,
            min(batch_size, len(fit)),
            rank=rank,
            world=world,
            seed=seed,
            split=split,
            loader_options=loader_options,
        )
        per_epoch = steps_per_epoch(len(train), batch_size, world)
    return CoefficientLoop(
        twa,
        data,
        total_steps=total_steps(twa.config.epochs, per_epoch),
        steps_per_epoch=per_epoch,
        hooks=hooks,
        **options,
    )


def standard_evaluation(
    bn_loader: Iterable[Any] | None,
    eval_loaders: Mapping[str, Iterable[Any] | None],
    *,
    bn_batches: int | None = None,
) -> Callable[[TWA], dict[str, Any]]:
    """``twa -> {"bn_state", "<split>_loss", "<split>_acc", ...}`` at the current weights:
    BatchNorm re-estimated on every worker's ``bn_loader`` (at most ``bn_batches`` each; None:
    kept as it is), then every ``eval_loaders`` split (None ones skipped), sums over all
    workers; the loss is ``twa.loss_fn``."""

    def run(twa: TWA) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if bn_loader is not None:
            out["bn_state"] = reestimate_bn(
                twa.model, bn_loader, device=twa.device, max_batches=bn_batches
            )
        for name, loader in eval_loaders.items():
            if loader is not None:
                r = evaluate_sharded(twa.model, loader, device=twa.device, loss_fn=twa.loss_fn)
                out.update({f"{name}_loss": r.loss, f"{name}_acc": r.acc})
        return out

    return run

"""Where the coefficient phase starts and what it keeps: the free averages, judged on held-out data.

The subspace holds every candidate :math:`w_k` at coefficients :math:`p_k`
(:attr:`Subspace.points <twa_ray.core.subspace.Subspace.points>`) and SWA at :math:`\\alpha_0`.
A host passes the sampling run's EMA as one more candidate; with a score :math:`s` on a *hold*
split that the coefficients are not fitted on (:func:`split_held_out`):

.. math::
    \\alpha_\\text{start} = \\arg\\max_{p \\,\\in\\, \\{\\alpha_0\\ (\\text{SWA}),\\ p_\\text{ema},\\
    p_\\text{last}\\}} s(\\theta(p)), \\qquad
    \\alpha_\\text{out} = \\arg\\max_{\\alpha \\,\\in\\, \\{\\alpha_\\text{start},\\ \\alpha_1, \\ldots,
    \\alpha_E\\}} s(\\theta(\\alpha))

(:math:`\\alpha_e`: after epoch e; ties keep the earlier). So the result scores on the hold split
at least as well as the best free average (up to the quantization of the basis at the points).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from twa_ray.core.loop import CoefficientLoop
    from twa_ray.core.subspace import Subspace
    from twa_ray.core.twa import TWA, Coefficients

__all__ = ["KeepBest", "choose_start", "run_chosen", "split_held_out", "start_points"]


def start_points(
    subspace: Subspace | Coefficients, named: Mapping[str, int | Sequence[int]]
) -> dict[str, torch.Tensor]:
    """The coefficients of named points: a candidate row k (negative: from the end), or the mean
    of several rows (the uniform average of those candidates: theta is affine in alpha).
    ``"swa"`` defaults to ``alpha0``, the mean of every candidate; name its rows when some
    candidates (the EMA) are not sampled iterates.

    >>> from twa_ray.core.layout import Layout
    >>> from twa_ray.core.subspace import build_affine
    >>> lay = Layout(("w",), ((4,),), ("float32",))
    >>> ws = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0]), torch.tensor([0, 0, 3.0, 0])]
    >>> sub = build_affine(lambda: iter(ws), lay, blocks=lay.blocks("model"), bits=32)
    >>> p = start_points(sub, {"swa": [0, 1], "ema": 2})
    >>> sub.reconstruct(p["swa"]), sub.reconstruct(p["ema"])
    (tensor([0.5000, 0.5000, 0.0000, 0.0000]), tensor([0., 0., 3., 0.]))
    """
    if subspace.points is None:
        raise ValueError("this subspace has no candidate points; build it with build_subspace")
    points = {"swa": subspace.alpha0}
    for name, rows in named.items():
        at = [rows] if isinstance(rows, int) else list(rows)
        points[name] = subspace.points[at].mean(dim=0)
    return points


@torch.no_grad()
def choose_start(
    twa: TWA,
    points: Mapping[str, torch.Tensor],
    evaluate: Callable[[TWA], Mapping[str, Any]],
    metric: str,
) -> tuple[str, dict[str, float]]:
    """Set ``twa.alpha`` to the point of highest ``evaluate(twa)[metric]`` (the first on a tie;
    a collective when ``evaluate`` is); returns its name and every point's score."""
    scores: dict[str, float] = {}
    for name, alpha in points.items():
        twa.alpha.copy_(alpha)
        twa.load_theta_()
        scores[name] = float(evaluate(twa)[metric])
    best = max(scores, key=lambda n: scores[n])
    twa.alpha.copy_(points[best])
    twa.load_theta_()
    return best, scores


class KeepBest:
    """An ``on_epoch`` hook: the alpha of the best ``record[metric]`` seen (``start_score`` at the
    start); :meth:`restore` puts it back after the loop (early stopping on held-out data)."""

    def __init__(self, twa: TWA, metric: str, start_score: float) -> None:
        self.twa, self.metric = twa, metric
        self.score, self.epoch = start_score, 0.0
        self.alpha = twa.alpha.detach().clone()

    def __call__(self, loop: CoefficientLoop, record: Mapping[str, Any]) -> None:
        if float(record[self.metric]) > self.score:
            self.score, self.epoch = float(record[self.metric]), float(record["epoch"])
            self.alpha = self.twa.alpha.detach().clone()

    @torch.no_grad()
    def restore(self) -> bool:
        """Load the kept alpha; True when it differs from the last one."""
        changed = not torch.equal(self.alpha, self.twa.alpha)
        self.twa.alpha.copy_(self.alpha)
        self.twa.load_theta_()
        return changed


def run_chosen(
    loop: CoefficientLoop,
    named: Mapping[str, int | Sequence[int]],
    metric: str,
    *,
    score_points: bool = False,
) -> dict[str, Any]:
    """Run ``loop`` with its engine's ``config.start`` and ``config.keep_best`` (the module
    docstring), the start points ``named`` as in :func:`start_points` (on the engine's
    placement), scored with the loop's ``evaluate`` hook by ``metric`` (``"hold_acc"``).
    ``loop.choices`` (also returned) holds ``start``, ``start_scores`` (the free averages'
    scores, filled before the first step) and ``kept_epoch`` (what applied). A resumed loop
    (``step_count > 0``) keeps its restored alpha and keeps the best from there on.
    ``score_points``: score the points (``start_scores``) even when starting at SWA."""
    twa, evaluate = loop.twa, loop.evaluate
    cfg, info = twa.config, loop.choices
    best_start = cfg.start == "best"
    if evaluate is None or not (best_start or cfg.keep_best or score_points):
        loop.run()
        return info
    score = None
    if (best_start or score_points) and twa.step_count == 0:
        points = start_points(twa.placement, named)
        name, scores = choose_start(twa, points, evaluate, metric)
        if not best_start:  # scored only: back to SWA
            name = "swa"
            twa.alpha.copy_(points["swa"])
            twa.load_theta_()
        info.update(start=name, start_scores=scores)
        score = scores[name]
    if not cfg.keep_best:
        loop.run()
        return info
    keep = KeepBest(twa, metric, float(evaluate(twa)[metric]) if score is None else score)
    inner = loop.on_epoch

    def on_epoch(lp: CoefficientLoop, record: dict[str, Any]) -> None:
        keep(lp, record)
        if inner is not None:
            inner(lp, record)

    loop.on_epoch = on_epoch
    loop.run()
    if twa.step_count < loop.total:  # stopped early (resumable): nothing to restore yet
        return info
    if keep.restore() and loop.final:
        loop.final = evaluate(twa)
    info["kept_epoch"] = keep.epoch
    return info


def split_held_out(dataset: Any, hold_frac: float, seed: int) -> tuple[Any, Any]:
    """``(fit, hold)`` subsets of ``dataset``: a seeded ``hold_frac`` of it for choices (the start,
    the kept epoch, the saved model), the rest for TWA-v to fit on (both keep >= 1 example)."""
    from torch.utils.data import Subset

    n = len(dataset)
    k = min(max(1, round(hold_frac * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, perm[k:]), Subset(dataset, perm[:k])

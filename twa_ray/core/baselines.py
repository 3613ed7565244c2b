"""Baselines on the same candidates: SWA (uniform average) and greedy soup.

- SWA (Izmailov et al., 2018): :math:`\\bar w = \\frac1K \\sum_k w_k`.
- Greedy soup (Wortsman et al., 2022): rank candidates by their own validation accuracy, then
  add each, best first, to the soup only if the soup's validation accuracy does not drop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["uniform_average", "greedy_soup", "SoupResult"]


def uniform_average(candidates: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean of the flat candidates, accumulated in float64, one candidate in memory at a time."""
    total: torch.Tensor | None = None
    count = 0
    for w in candidates:
        total = w.double().clone() if total is None else total.add_(w.double())
        count += 1
    if total is None:
        raise ValueError("cannot average zero candidates; the store is empty")
    return (total / count).float()


@dataclass(frozen=True)
class SoupResult:
    theta: torch.Tensor  # (D,) the soup
    kept: tuple[int, ...]  # candidate indices in the soup, in the order they were added
    individual: tuple[float, ...]  # each candidate's own score
    score: float  # the soup's score


def greedy_soup(
    get: Callable[[int], torch.Tensor] | Sequence[torch.Tensor],
    num: int,
    score: Callable[[torch.Tensor], float],
) -> SoupResult:
    """Greedy soup over ``num`` candidates fetched by index with ``get``.

    ``score`` maps a flat weight vector to validation accuracy (higher is better); it is called
    ``2 * num - 1`` times at most.
    """
    fetch = get.__getitem__ if isinstance(get, Sequence) else get
    if num < 1:
        raise ValueError("greedy soup needs at least one candidate")
    individual = [score(fetch(i)) for i in range(num)]
    order = sorted(range(num), key=lambda i: -individual[i])
    total = fetch(order[0]).double().clone()
    kept = [order[0]]
    best = individual[order[0]]
    for i in order[1:]:
        trial = total + fetch(i).double()
        s = score((trial / (len(kept) + 1)).float())
        if s >= best:
            total, best = trial, s
            kept.append(i)
    return SoupResult((total / len(kept)).float(), tuple(kept), tuple(individual), best)

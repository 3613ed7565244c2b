"""Exponential moving averages of the weights along an SGD run (the ``ema`` baseline).

For each decay :math:`\\beta` the bias-corrected average of the parameters after ``t`` steps,

.. math::
    m_t = \\beta\\, m_{t-1} + (1 - \\beta)\\, \\theta_t, \\quad m_0 = 0, \\qquad
    \\bar\\theta_t = \\frac{m_t}{1 - \\beta^t}
    = \\frac{\\sum_{s \\le t} \\beta^{t-s} \\theta_s}{\\sum_{s \\le t} \\beta^{t-s}},

so the initial weights get no special weight (timm's ``ModelEmaV3`` warms its decay up instead;
torch's ``swa_utils.get_ema_multi_avg_fn`` starts from the first weights). One fused
``_foreach_lerp_`` per decay and step, as in ``swa_utils``; buffers (BatchNorm statistics) are
not averaged: they are re-estimated for the averaged weights, like SWA's.

>>> import torch
>>> lin = torch.nn.Linear(2, 1)
>>> ema = EMA(lin, decays=(0.5,))
>>> with torch.no_grad():
...     for v in (1.0, 3.0):
...         _ = lin.weight.fill_(v)
...         ema.update()
>>> averages(ema.state_dict())[0.5]["weight"]  # (0.5 * 1 + 1 * 3) / 1.5
tensor([[2.3333, 2.3333]])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["EMA", "EMA_DECAYS", "averages"]

EMA_DECAYS = (0.99, 0.998, 0.9995)
"""Per-step decays kept during sampling (horizons of ~100, 500 and 2,000 steps); the one used
is chosen on the validation split."""


class EMA:
    """Bias-corrected moving averages of ``module``'s parameters, one per decay."""

    def __init__(self, module: nn.Module, decays: Sequence[float] = EMA_DECAYS) -> None:
        if not decays or any(not 0.0 < d < 1.0 for d in decays):
            raise ValueError(f"EMA decays {list(decays)} must lie in (0, 1)")
        self.decays = tuple(float(d) for d in decays)
        self.names, self.params = zip(*module.named_parameters(), strict=True)
        self.sums = [
            [torch.zeros_like(p, dtype=torch.float32) for p in self.params] for _ in self.decays
        ]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current parameters into every average."""
        self.steps += 1
        params = [p.detach().float() for p in self.params]
        for decay, sums in zip(self.decays, self.sums, strict=True):
            torch._foreach_lerp_(sums, params, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (``torch.load(weights_only=True)`` reads it)."""
        return {
            "decays": list(self.decays),
            "steps": self.steps,
            "sums": [dict(zip(self.names, sums, strict=True)) for sums in self.sums],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["decays"]) != self.decays:
            raise ValueError(
                f"EMA state has decays {state['decays']}, expected {list(self.decays)}"
            )
        for sums, saved in zip(self.sums, state["sums"], strict=True):
            for m, n in zip(sums, self.names, strict=True):
                m.copy_(saved[n])
        self.steps = int(state["steps"])


def averages(state: Mapping[str, Any]) -> dict[float, dict[str, torch.Tensor]]:
    """``{decay: parameters}`` from an :meth:`EMA.state_dict` (on the driver, no module needed)."""
    steps = int(state["steps"])
    if steps == 0:
        return {}
    return {
        float(d): {n: (m / (1.0 - d**steps)).cpu() for n, m in sums.items()}
        for d, sums in zip(state["decays"], state["sums"], strict=True)
    }

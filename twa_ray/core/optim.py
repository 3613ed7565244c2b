"""The coefficient optimizer: SGD with momentum or AdamW over alpha, with a warm-up + decay schedule.

The learning rate is a pure function of the step (nanoGPT's ``get_lr``):

.. math::
    \\eta_t = \\eta \\cdot \\begin{cases}
        (t + 1) / T_w & t < T_w \\\\
        s\\big((t - T_w) / (T - T_w)\\big) & \\text{otherwise}
    \\end{cases}

with :math:`s` constant (1), linear (1 - u), cosine (½(1 + cos πu)), step
(``gamma ** floor((t - T_w) / step_size)``), multistep (``gamma ** ([u >= 1/2] + [u >= 3/4])``,
the step schedule of the TWA paper) or flat_cosine (1 for u < 1/2, then ½(1 + cos π(2u - 1))).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["lr_factor", "make_optimizer"]

SCHEDULES = ("constant", "step", "linear", "cosine", "multistep", "flat_cosine")
OPTIMIZERS = ("sgd", "adamw")
Schedule = Literal["constant", "step", "linear", "cosine", "multistep", "flat_cosine"]


def lr_factor(
    step: int,
    total_steps: int,
    *,
    schedule: Schedule = "cosine",
    warmup_steps: int = 0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    >>> lr_factor(0, 10, schedule="linear", warmup_steps=2)
    0.5
    >>> [lr_factor(t, 8, schedule="multistep") for t in (3, 4, 5, 6, 7)]  # x0.1 at 50 % and 75 %
    [1.0, 0.1, 0.1, 0.010000000000000002, 0.010000000000000002]
    >>> [lr_factor(t, 8, schedule="flat_cosine") for t in (0, 3, 4, 6)]  # flat, then cosine to 0
    [1.0, 1.0, 1.0, 0.5]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = step - warmup_steps
    span = max(total_steps - warmup_steps, 1)
    u = min(t / span, 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - u
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u))
    if schedule == "step":
        return gamma ** (t // max(step_size, 1))
    if schedule == "multistep":  # integer comparisons: the drops fall on exact steps
        return gamma ** ((2 * t >= span) + (4 * t >= 3 * span))
    if schedule == "flat_cosine":
        return 1.0 if 2 * t < span else 0.5 * (1.0 + math.cos(math.pi * min(2 * u - 1.0, 1.0)))
    raise ValueError(f"schedule={schedule!r} is not supported; use one of {', '.join(SCHEDULES)}")


def make_optimizer(
    alpha: torch.Tensor,
    *,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    total_steps: int,
    schedule: Schedule = "cosine",
    warmup_steps: int = 0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer + scheduler over the coefficient tensor ``alpha`` (a leaf that holds ``.grad``).

    Weight decay pulls alpha towards 0, that is towards the starting point of the subspace
    (the SWA solution for the affine variant).
    """
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(
            [alpha], lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False
        )
    elif optimizer == "adamw":
        opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=weight_decay, foreach=False)
    else:
        raise ValueError(
            f"optimizer={optimizer!r} is not supported; use one of {', '.join(OPTIMIZERS)}"
        )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda t: lr_factor(
            t,
            total_steps,
            schedule=schedule,
            warmup_steps=warmup_steps,
            step_size=step_size,
            gamma=gamma,
        ),
    )
    return opt, sched

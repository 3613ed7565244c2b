"""The coefficient optimizer: SGD with momentum or AdamW over alpha, with a warm-up + decay schedule.

The learning rate is a pure function of the step (nanoGPT's ``get_lr``):

.. math::
    \\eta_t = \\eta \\cdot \\begin{cases}
        (t + 1) / T_w & t < T_w \\\\
        s\\big((t - T_w) / (T - T_w)\\big) & \\text{otherwise}
    \\end{cases}

with :math:`s` constant (1), linear (1 - u), cosine (½(1 + cos πu)) or step
(``gamma ** floor((t - T_w) / step_size)``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["SCHEDULES", "OPTIMIZERS", "lr_factor", "make_optimizer"]

SCHEDULES = ("constant", "step", "linear", "cosine")
OPTIMIZERS = ("sgd", "adamw")
Schedule = Literal["constant", "step", "linear", "cosine"]


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
        opt = torch.optim.SGD([alpha], lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=weight_decay, foreach=False)
    else:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {', '.join(OPTIMIZERS)}")
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

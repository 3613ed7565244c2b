import math

import pytest
import torch

from twa_ray.core.optim import lr_factor, make_optimizer


def test_warmup_then_cosine():
    f = [lr_factor(t, 10, schedule="cosine", warmup_steps=2) for t in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


def test_linear_step_constant():
    assert lr_factor(5, 10, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(7, 100, schedule="step", step_size=3, gamma=0.5) == pytest.approx(0.25)
    assert lr_factor(99, 100, schedule="constant") == 1.0


def test_scheduler_drives_the_optimizer_lr():
    alpha = torch.zeros(3, 2)
    opt, sched = make_optimizer(alpha, lr=0.2, total_steps=4, schedule="linear")
    lrs = []
    for _ in range(4):
        alpha.grad = torch.ones_like(alpha)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.15, 0.1, 0.05])


def test_bad_optimizer_name():
    with pytest.raises(ValueError, match="optimizer='adam'"):
        make_optimizer(torch.zeros(1), optimizer="adam", lr=0.1, total_steps=1)  # type: ignore[arg-type]

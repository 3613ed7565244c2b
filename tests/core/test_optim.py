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


@pytest.mark.parametrize("warmup", [0, 3])
def test_multistep_drops_at_half_and_three_quarters_of_the_post_warmup_steps(warmup):
    total, gamma = 43, 0.1
    span = total - warmup
    got = torch.tensor(
        [
            lr_factor(t, total, schedule="multistep", warmup_steps=warmup, gamma=gamma)
            for t in range(total)
        ],
        dtype=torch.float64,
    )
    u = (torch.arange(total, dtype=torch.float64) - warmup) / span
    want = gamma ** ((u >= 0.5).double() + (u >= 0.75).double())
    want[:warmup] = torch.arange(1, warmup + 1, dtype=torch.float64) / max(warmup, 1)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("warmup", [0, 3])
def test_flat_cosine_is_constant_for_half_then_a_cosine_to_zero(warmup):
    total = 41
    span = total - warmup
    got = torch.tensor(
        [lr_factor(t, total, schedule="flat_cosine", warmup_steps=warmup) for t in range(total)],
        dtype=torch.float64,
    )
    u = (torch.arange(total, dtype=torch.float64) - warmup) / span
    want = torch.where(u < 0.5, 1.0, 0.5 * (1 + torch.cos(torch.pi * (2 * u - 1))))
    want[:warmup] = torch.arange(1, warmup + 1, dtype=torch.float64) / max(warmup, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert got[warmup:].diff().le(0).all() and got[-1] < 0.01

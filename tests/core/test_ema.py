"""The moving averages of the ``ema`` baseline against their definition in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from twa_ray.core.ema import EMA, averages


def _reference(thetas: list[torch.Tensor], decay: float) -> torch.Tensor:
    """sum_s decay^(t-s) theta_s / sum_s decay^(t-s), in float64."""
    t = len(thetas)
    w = torch.tensor([decay ** (t - 1 - s) for s in range(t)], dtype=torch.float64)
    stacked = torch.stack([x.double() for x in thetas])
    return (w[:, None] * stacked).sum(0) / w.sum()


def _walk(module: nn.Module, ema: EMA, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update()
        seen.append(torch.cat([p.detach().flatten().clone() for p in module.parameters()]))
    return seen


@settings(max_examples=25, deadline=None)
@given(
    decays=st.lists(st.floats(0.05, 0.999), min_size=1, max_size=3, unique=True),
    steps=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_average_is_the_bias_corrected_weighted_mean(decays, steps, seed):
    module = nn.Linear(3, 2)
    ema = EMA(module, decays)
    seen = _walk(module, ema, steps, seed)
    avg = averages(ema.state_dict())
    assert list(avg) == [float(d) for d in decays]
    for decay, params in avg.items():
        flat = torch.cat([params[n].flatten() for n, _ in module.named_parameters()])
        torch.testing.assert_close(flat.double(), _reference(seen, decay), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_resumes_exactly():
    """Checkpoint after 7 steps, restore into a fresh EMA of another module, go on: the same
    averages as an uninterrupted run (what a restarted sampling worker does)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    b = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    b.load_state_dict(a.state_dict())
    ema_a, ema_b = EMA(a), EMA(b)
    _walk(a, ema_a, 7, seed=1)
    _walk(b, ema_b, 7, seed=1)
    resumed = EMA(b)
    resumed.load_state_dict(ema_b.state_dict())
    _walk(a, ema_a, 5, seed=2)
    _walk(b, resumed, 5, seed=2)
    for (da, pa), (db, pb) in zip(
        averages(ema_a.state_dict()).items(), averages(resumed.state_dict()).items()
    ):
        assert da == db and set(pa) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # no buffers
        for n in pa:
            torch.testing.assert_close(pa[n], pb[n], rtol=0, atol=0)


def test_bad_decays_and_mismatched_state_are_refused():
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        EMA(nn.Linear(2, 2), (0.9, 1.0))
    ema = EMA(nn.Linear(2, 2), (0.9,))
    with pytest.raises(ValueError, match="decays"):
        EMA(nn.Linear(2, 2), (0.99,)).load_state_dict(ema.state_dict())
    assert averages(ema.state_dict()) == {}  # no step seen: no average

import pytest
import torch
from torch import nn

from twa_ray.core.baselines import greedy_soup, uniform_average
from twa_ray.core.bn import bn_state, load_bn_state_, update_bn


def test_update_bn_matches_exact_statistics_for_any_batch_form():
    x = torch.randn(64, 3) * 2 + 1
    for batches in ([x], [(x, torch.zeros(64))], [{"x": x, "y": torch.zeros(64)}]):
        net = nn.Sequential(nn.BatchNorm1d(3, momentum=0.3))
        net.eval()
        assert update_bn(batches, net) == 1
        bn = net[0]
        assert torch.allclose(bn.running_mean, x.mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var, x.var(0, unbiased=True), atol=1e-4)
        assert bn.momentum == 0.3 and not net.training  # restored


def test_update_bn_cumulative_average_over_batches():
    xs = [torch.randn(16, 2) + i for i in range(4)]
    net = nn.BatchNorm1d(2)
    update_bn(xs, net)
    expected = torch.stack([x.mean(0) for x in xs]).mean(0)
    assert torch.allclose(net.running_mean, expected, atol=1e-5)


def test_bn_state_round_trip():
    net = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    update_bn([torch.randn(8, 3)], net)
    state = bn_state(net)
    fresh = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    load_bn_state_(fresh, state)
    assert torch.equal(bn_state(fresh), state)
    with pytest.raises(ValueError, match="BN state"):
        load_bn_state_(fresh, state[:-1])


def test_uniform_average_float64_accumulation():
    cands = [torch.full((5,), float(i)) for i in range(4)]
    assert torch.equal(uniform_average(iter(cands)), torch.full((5,), 1.5))
    with pytest.raises(ValueError, match="zero candidates"):
        uniform_average(iter([]))


def test_greedy_soup_keeps_only_helpful_candidates():
    target = torch.tensor([1.0, 1.0])
    cands = [torch.tensor([1.0, 0.8]), torch.tensor([1.0, 1.2]), torch.tensor([5.0, -3.0])]

    def score(theta):
        return -float((theta - target).norm())

    res = greedy_soup(cands, len(cands), score)
    assert set(res.kept) == {0, 1}
    assert torch.allclose(res.theta, target)
    assert res.score == pytest.approx(0.0)

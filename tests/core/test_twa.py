import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twa_ray.core.layout import Layout, flatten
from twa_ray.core.twa import TWA, TWAConfig


def mse(out, y, reduction="mean"):
    return F.mse_loss(out, y, reduction=reduction)


def linear_problem(num=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(5, 3)
    cands = [
        {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        for _ in range(num)
    ]
    x = torch.randn(32, 5, generator=g)
    y = torch.randn(32, 3, generator=g)
    return model, cands, x, y


def test_span_step_equals_projected_sgd_float64():
    """One TWA step on the span subspace is theta - lr * B^T B g (the ICLR paper's update)."""
    model, cands, x, y = linear_problem()
    lr = 0.3
    twa = TWA(
        model,
        cands,
        subspace="span",
        blocks="model",
        bits=32,
        lr=lr,
        momentum=0.0,
        schedule="constant",
        loss_fn=mse,
    )
    layout = Layout.from_module(model)
    theta0 = flatten(model, layout).double()
    # float64 reference: projector onto span{w_k - c} and the gradient of the MSE at theta0
    w = torch.stack([flatten(c, layout).double() for c in cands])
    centred = w - w.mean(0)
    u, s, _ = torch.linalg.svd(centred.T, full_matrices=False)
    basis = u[:, s > 1e-10 * s.max()]
    proj = basis @ basis.T
    ref = nn.Linear(5, 3).double()
    ref.weight.data = theta0[:15].view(3, 5).clone()
    ref.bias.data = theta0[15:].clone()
    F.mse_loss(ref(x.double()), y.double()).backward()
    g = torch.cat([ref.weight.grad.flatten(), ref.bias.grad])
    expected = theta0 - lr * proj @ g
    twa.start(total_steps=1)
    a, *_ = twa.coefficient_grad((x, y))
    twa.apply_(a)
    got = flatten(model, layout).double()
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < 1e-5


@pytest.mark.parametrize(
    "subspace,blocks,opt",
    [("affine", "tensor", "sgd"), ("span", "model", "adamw"), ("affine", "model", "adamw")],
)
def test_fit_reduces_the_loss(subspace, blocks, opt):
    model, cands, x, y = linear_problem(num=6)
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    twa = TWA(
        model, cands, subspace=subspace, blocks=blocks, optimizer=opt, bits=8, lr=0.05, loss_fn=mse
    )
    with torch.no_grad():
        before = float(mse(model(x), y))
    twa.fit(data, epochs=20)
    with torch.no_grad():
        after = float(mse(model(x), y))
    assert after < before
    assert twa.step_count == 80


def test_state_dict_round_trip_resumes_identically():
    model, cands, x, y = linear_problem()
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    a = TWA(model, cands, bits=4, lr=0.05, loss_fn=mse)
    a.fit(data, epochs=1)
    state = a.state_dict()
    a.fit(data, epochs=1)
    model_b = nn.Linear(5, 3)
    b = TWA(model_b, cands, bits=4, lr=0.05, loss_fn=mse)
    b.load_state_dict(state, total_steps=4)
    b.fit(data, epochs=1)
    assert torch.equal(a.alpha, b.alpha)


def test_config_reports_all_errors_at_once():
    with pytest.raises(ValueError) as err:
        TWAConfig(bits=3, lr=-1.0, epochs=0, blocks="layer")
    msg = str(err.value)
    for part in ("bits=3", "lr=-1.0", "epochs=0", "blocks='layer'"):
        assert part in msg


def test_candidates_from_another_model_are_refused():
    model, _, _, _ = linear_problem()
    other = [
        {n: torch.randn(p.shape) for n, p in nn.Linear(5, 4).named_parameters()} for _ in range(3)
    ]
    with pytest.raises(ValueError, match="shape"):
        TWA(model, other)

"""Where the coefficient phase starts and what it keeps (twa_ray.core.start, issue 29 item 1)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twa_ray.core.layout import Layout, flatten
from twa_ray.core.loop import CoefficientLoop, LoaderBatches, LoopHooks
from twa_ray.core.start import KeepBest, choose_start, run_chosen, split_held_out, start_points
from twa_ray.core.twa import TWA, TWAConfig, build_subspace


def _problem(num=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(5, 3).double()
    layout = Layout.from_module(model)
    cands = [torch.randn(layout.numel, generator=g, dtype=torch.float64) for _ in range(num)]
    x, y = torch.randn(32, 5, generator=g).double(), torch.randn(32, 3, generator=g).double()
    return model, layout, cands, x, y


@pytest.mark.parametrize(
    "opts", [{}, {"subspace": "span", "blocks": "model"}, {"blocks": "tensor"}]
)
def test_points_reconstruct_each_candidate_float64(opts):
    """theta(points[k]) is candidate k, and the mean of points is their uniform average
    (unquantized basis: exactly, up to float32 storage)."""
    _, layout, cands, _, _ = _problem()
    sub = build_subspace([c.float() for c in cands], layout, TWAConfig(bits=32, **opts))
    assert sub.points is not None and sub.points.shape[0] == len(cands)
    for k, c in enumerate(cands):
        assert torch.allclose(sub.reconstruct(sub.points[k]).double(), c, atol=1e-5)
    p = start_points(sub, {"swa": [0, 2], "last": -1})
    assert torch.allclose(sub.reconstruct(p["swa"]).double(), (cands[0] + cands[2]) / 2, atol=1e-5)
    assert torch.allclose(sub.reconstruct(p["last"]).double(), cands[-1], atol=1e-5)
    assert torch.equal(start_points(sub, {})["swa"], sub.alpha0)


def _twa(**cfg):
    model, layout, cands, x, y = _problem()
    model = model.float()
    twa = TWA(model, [c.float() for c in cands], bits=32, loss_fn=F.mse_loss, **cfg)
    return twa, cands, [(x.float(), y.float())]


def _score_near(target: torch.Tensor):
    """A held-out score: minus the distance of the weights from ``target`` (larger is better)."""

    def evaluate(twa: TWA) -> dict[str, float]:
        return {"hold_acc": -float((twa.theta.double() - target).norm())}

    return evaluate


def test_choose_start_picks_the_best_point_and_leaves_alpha_there():
    twa, cands, _ = _twa()
    sub = build_subspace([c.float() for c in cands], twa.layout, twa.config)
    points = start_points(sub, {"last": -1, "first": 0})
    name, scores = choose_start(twa, points, _score_near(cands[0]), "hold_acc")
    assert name == "first" and set(scores) == {"swa", "last", "first"}
    assert scores["first"] == max(scores.values())
    assert torch.equal(twa.alpha, points["first"])
    assert torch.allclose(flatten(twa.model, twa.layout).double(), cands[0], atol=1e-5)


def test_keep_best_restores_the_start_when_no_epoch_beats_it():
    """Early stopping: when every epoch scores worse on hold, the start comes back."""
    twa, cands, data = _twa(lr=0.5, momentum=0.0, schedule="constant")
    start = twa.alpha.clone()
    evaluate = _score_near(twa.theta.double().clone())  # the start is the best possible
    keep = KeepBest(twa, "hold_acc", evaluate(twa)["hold_acc"])
    hooks = LoopHooks(evaluate=evaluate, on_epoch=keep)
    CoefficientLoop(twa, LoaderBatches(data), total_steps=3, steps_per_epoch=1, hooks=hooks).run()
    assert not torch.equal(twa.alpha, start)  # the loop moved alpha
    assert keep.restore() and torch.equal(twa.alpha, start) and keep.epoch == 0.0


def test_keep_best_keeps_an_epoch_that_improves():
    twa, cands, data = _twa(lr=0.1, momentum=0.0, schedule="constant")
    keep = KeepBest(twa, "hold_acc", float("-inf"))
    keep(None, {"hold_acc": 1.0, "epoch": 1.0})
    at_one = twa.alpha.clone()
    twa.alpha.add_(1.0)
    keep(None, {"hold_acc": 1.0, "epoch": 2.0})  # a tie keeps the earlier
    assert keep.restore() and torch.equal(twa.alpha, at_one) and keep.epoch == 1.0


@pytest.mark.parametrize("start,keep_best", [("best", True), ("best", False), ("swa", True)])
def test_run_chosen_never_ends_below_its_start_on_hold(start, keep_best):
    """The result scores on hold at least as well as every free point when start='best' and
    keep_best are on; each option alone does what it says."""
    twa, cands, data = _twa(
        lr=0.5, momentum=0.0, schedule="constant", start=start, keep_best=keep_best
    )
    evaluate = _score_near(cands[-1])
    loop = CoefficientLoop(
        twa,
        LoaderBatches(data),
        total_steps=3,
        steps_per_epoch=1,
        hooks=LoopHooks(evaluate=evaluate),
    )
    info = run_chosen(loop, {"last": -1}, "hold_acc")
    assert info is loop.choices
    assert ("start" in info) == (start == "best") and ("kept_epoch" in info) == keep_best
    final = evaluate(twa)["hold_acc"]
    if start == "best":
        assert info["start"] == "last"
    if start == "best" and keep_best:
        assert final >= max(info["start_scores"].values())
        assert loop.final["hold_acc"] == final
    assert twa.step_count == 3


def test_split_held_out_is_a_seeded_partition():
    data = list(range(10))
    fit, hold = split_held_out(data, 0.3, seed=1)
    assert sorted(fit.indices + hold.indices) == data and len(hold) == 3
    assert split_held_out(data, 0.3, seed=1)[1].indices == hold.indices
    assert len(split_held_out(data[:2], 0.9, seed=0)[0]) == 1  # both parts keep an example

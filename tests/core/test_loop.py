"""The core coefficient loop: step/pass/epoch counts, resume replay, hooks (no Ray)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from twa_ray.core.loop import (
    CoefficientLoop,
    CoeffState,
    LoopHooks,
    ShuffledBatches,
    steps_per_epoch,
    total_steps,
)
from twa_ray.core.twa import TWA


def mse(out, y):
    return F.mse_loss(out, y)


def problem(seed=0, n=50):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(5, 3)
    cands = [
        {k: torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}
        for _ in range(4)
    ]
    ds = TensorDataset(torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g))
    return model, cands, ds


@pytest.mark.parametrize(
    "n,batch,world,expected",
    [(50, 8, 1, 6), (50, 8, 2, 6), (51, 8, 2, 6), (7, 8, 1, 1), (1000, 128, 3, 7)],
)
def test_steps_per_epoch_counts_whole_batches_per_worker(n, batch, world, expected):
    assert steps_per_epoch(n, batch, world) == expected
    if n >= batch:  # one pass of ShuffledBatches over the training split is one epoch
        assert ShuffledBatches(list(range(n)), batch, world=world).steps_per_pass == expected


def test_shuffled_batches_replay_a_pass_from_any_step():
    """A pass is a seeded permutation (not the identity), another pass another one, the same
    seed the same one; a pass replays from any step."""

    def order(data, pass_index):
        return [i for b in data.batches(pass_index, 0) for i in b.tolist()]

    data = ShuffledBatches(list(range(50)), 8, seed=3)
    full = [b.tolist() for b in data.batches(2, 0)]
    assert len(full) == 6 and all(len(b) == 8 for b in full)
    seen = sum(full, [])
    assert len(set(seen)) == 48 and set(seen) < set(range(50))  # distinct; 2 dropped (drop_last)
    assert sorted(seen) != list(range(48))  # the 2 dropped are the shuffle's last, not 48 and 49
    assert seen != sorted(seen)  # not the identity order
    assert [b.tolist() for b in data.batches(2, 4)] == full[4:]
    assert [b.tolist() for b in data.batches(3, 0)] != full  # another pass, another order
    passes = [order(data, p) for p in range(4)]
    assert len({tuple(p) for p in passes}) == 4  # every pass its own order
    again = ShuffledBatches(list(range(50)), 8, seed=3)
    assert [order(again, p) for p in range(4)] == passes  # the same seed: the same orders
    assert order(ShuffledBatches(list(range(50)), 8, seed=4), 0) != passes[0]  # another seed
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 50 examples of the fit split"):
        ShuffledBatches(list(range(50)), 64)


def _loop(model, cands, ds, sync_every=None, **hooks):
    twa = TWA(model, cands, bits=8, lr=0.05, loss_fn=mse)
    per_epoch = steps_per_epoch(len(ds), 8)
    return CoefficientLoop(
        twa,
        ShuffledBatches(ds, 8, seed=1),
        total_steps=total_steps(2.5, per_epoch),
        steps_per_epoch=per_epoch,
        sync_every=sync_every,
        hooks=LoopHooks(**hooks),
    )


def test_a_stopped_and_resumed_loop_ends_where_an_uninterrupted_one_does():
    model, cands, ds = problem()
    ref = _loop(model, cands, ds).run()
    assert ref.twa.step_count == 15 and [h["step"] for h in ref.history] == [6, 12, 15]
    saved: list[CoeffState] = []
    first = _loop(
        nn.Linear(5, 3),
        cands,
        ds,
        sync_every=4,
        on_sync=lambda loop, rec: saved.append(loop.state()),
        should_stop=lambda: len(saved) == 2,
    )
    first.run()
    state = CoeffState.from_dict(saved[-1].to_dict())
    assert state.twa["step"] == 6  # syncs at 4 (every 4 steps) and 6 (the pass end)
    second = _loop(nn.Linear(5, 3), cands, ds)
    second.load_state(state)
    second.run()
    assert torch.equal(second.twa.alpha, ref.twa.alpha)
    assert [h["loss"] for h in second.history] == pytest.approx(
        [h["loss"] for h in ref.history], rel=1e-12
    )


def test_epoch_hook_evaluates_after_every_epoch_and_the_last_step():
    model, cands, ds = problem()
    seen = []
    loop = _loop(
        model,
        cands,
        ds,
        evaluate=lambda twa: {"step_seen": twa.step_count},
        on_epoch=lambda loop, rec: seen.append((rec["step"], rec["step_seen"], rec["epoch"])),
    )
    loop.run()
    assert seen == [(6, 6, 1.0), (12, 12, 2.0), (15, 15, 2.5)]
    assert loop.final == {"step_seen": 15}  # evaluated once at the last step, not twice


def test_fit_cycles_a_plain_loader_and_continues_its_schedule():
    model, cands, ds = problem()
    batches = [(ds.tensors[0][i : i + 10], ds.tensors[1][i : i + 10]) for i in range(0, 50, 10)]
    steps = []
    twa = TWA(model, cands, bits=8, lr=0.05, loss_fn=mse)
    twa.fit(batches, epochs=1.4, on_step=lambda step, loss: steps.append(step))
    assert steps == list(range(1, 8))  # round(1.4 * 5) steps, the loader cycled
    twa.fit(iter(batches), steps=3)  # no length: steps given
    assert twa.step_count == 10
    with pytest.raises(ValueError, match="no length"):
        twa.fit(iter(batches))

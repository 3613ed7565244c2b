"""The callbacks' fit-end phase under DDP (2 gloo processes): BatchNorm is re-estimated over
every rank's batches, as the Ray coefficient group does, and the metrics are summed over the
ranks: both equal one process's estimate over the union of the ranks' data."""

import itertools
import os

import pytest
import torch
from helpers import spawn_gloo
from torch import nn

from twa_ray.core.bn import bn_state, update_bn
from twa_ray.core.evaluate import evaluate
from twa_ray.core.layout import Layout, load_flat_
from twa_ray.integrations._common import Snapshots, learn
from twa_ray.store.store import CandidateStore

WORLD, NAMES = 2, [f"step{s:08d}" for s in (1, 2, 3)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _batches(rank: int, split: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches (its half of the data, as a DistributedSampler gives it); the ranks'
    data differ in scale, so a per-rank BN estimate is far from the union's."""
    g = torch.Generator().manual_seed(10 * split + rank)
    return [
        (
            torch.randn(8, 4, generator=g) * (1 + 3 * rank) + rank,
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(3)
    ]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    snaps = Snapshots(store, every_n_epochs=1)
    snaps.load_state_dict({"store": store, "names": NAMES})
    model = _model()
    twa, metrics = learn(
        model,
        snaps,
        twa_config(),
        "twa-t",
        train=_batches(rank, 0),
        val=_batches(rank, 1),
        loss_fn=nn.functional.cross_entropy,
    )
    torch.save(
        {"theta": twa.theta, "bn": bn_state(model), "metrics": metrics},
        os.path.join(out, f"{rank}.pt"),
    )


def twa_config():
    from twa_ray.core.twa import TWAConfig

    return TWAConfig(bits=8, blocks="tensor", lr=0.05, epochs=1.0)


@pytest.mark.slow  # spawns 2 gloo processes
def test_bn_and_metrics_are_over_all_ranks(tmp_path):
    store = CandidateStore(str(tmp_path / "s"), create=True)
    g = torch.Generator().manual_seed(1)
    model = _model()
    for step, name in enumerate(NAMES, 1):
        params = {
            n: p + 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()
        }
        store.write(params, Layout.from_module(model), step=step, name=name)
    spawn_gloo(_worker, WORLD, tmp_path, store.uri, str(tmp_path))
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]
    assert torch.equal(ranks[0]["theta"], ranks[1]["theta"])
    assert (
        torch.equal(ranks[0]["bn"], ranks[1]["bn"]) and ranks[0]["metrics"] == ranks[1]["metrics"]
    )
    # one process, the same weights, the union of the ranks' data
    single = _model()
    load_flat_(single, ranks[0]["theta"], Layout.from_module(single))
    update_bn(itertools.chain(*(_batches(r, 0) for r in range(WORLD))), single)
    torch.testing.assert_close(ranks[0]["bn"], bn_state(single), rtol=1e-5, atol=1e-6)
    rank0_only = _model()
    load_flat_(rank0_only, ranks[0]["theta"], Layout.from_module(rank0_only))
    update_bn(_batches(0, 0), rank0_only)
    assert not torch.allclose(ranks[0]["bn"], bn_state(rank0_only), rtol=1e-2)  # per rank: far off
    union = evaluate(single, itertools.chain(*(_batches(r, 1) for r in range(WORLD))))
    m = ranks[0]["metrics"]
    assert m["twa/twa_acc"] == pytest.approx(union.acc) and m["twa/twa_loss"] == pytest.approx(
        union.loss, rel=1e-5
    )

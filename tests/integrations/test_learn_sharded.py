"""``twa_ray.train.snapshot`` / ``learn`` on an FSDP2-sharded model (no Ray: 2 spawned gloo
processes, as on the ranks of a Ray Train loop): the candidates are written shard by shard, and
alpha learned on the shards equals the unsharded ``learn``'s over the same store and the ranks'
batches joined (rtol 1e-5)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import spawn_gloo

import twa_ray.train
from tests.fsdp_tiny import batch, make_model
from twa_ray.core.layout import Layout, flatten
from twa_ray.core.sharded import LocalShards, local_flat
from twa_ray.core.sharded_twa import ShardedTWA
from twa_ray.ray.fsdp import shard_model
from twa_ray.store import CandidateStore

WORLD = 2
STEPS = 8  # SGD steps; a sharded snapshot every 2
LEARN = {"bits": 8, "lr": 0.05, "epochs": 1}
LEARN_STEPS = 8  # rank 0's batches (rank 1 has one more)


def rank_batches(rank: int, n: int, first: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(first + s, rank) for s in range(n)]


def joined_batches(n: int, first: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Step s's batches of every rank as one batch: the mean gradient FSDP's reduce-scatter
    gives (equal batch sizes)."""
    per_rank = [rank_batches(r, n, first) for r in range(WORLD)]
    return [tuple(torch.cat(parts) for parts in zip(*step)) for step in zip(*per_rank)]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    model = shard_model(make_model(), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(rank_batches(rank, STEPS), start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 2 == 0:
            twa_ray.train.snapshot(model, store, step=step, run_id="sharded")
    # rank 1 has one batch more: every rank runs the fewest steps (rank 0's)
    loader = rank_batches(rank, LEARN_STEPS + rank, first=100)
    twa = twa_ray.train.learn(model, store, loader, **LEARN)
    torch.save(
        {
            "sharded": isinstance(twa, ShardedTWA),
            "steps": twa.step_count,
            "alpha": twa.alpha,
            "theta": twa.theta,
            "local": local_flat(model),
            "index": LocalShards.from_module(model).index(),
            "full": {n: p.full_tensor() for n, p in model.named_parameters()},
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


@pytest.mark.slow  # spawns 2 gloo processes
def test_learn_on_shards_equals_the_unsharded_learn(tmp_path):
    store = str(tmp_path / "candidates")
    spawn_gloo(_worker, WORLD, tmp_path, store, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # the candidates: one part per rank (no gather), joined on read
    names = CandidateStore(store).names()
    assert names == [f"step{s:08d}" for s in (2, 4, 6, 8)]
    for name in names:
        parts = sorted(p.name for p in (tmp_path / "candidates" / f"{name}.parts").iterdir())
        assert parts == [f"part-{r:05d}-of-{WORLD:05d}.arrow" for r in range(WORLD)]

    ref_model = make_model()
    ref = twa_ray.train.learn(ref_model, store, joined_batches(LEARN_STEPS, first=100), **LEARN)
    assert type(ref) is not ShardedTWA and ref.step_count == LEARN_STEPS
    assert (ref.alpha - ref.placement.alpha0).abs().max() > 1e-3  # alpha moved

    layout = Layout.from_module(ref_model)
    covered = torch.zeros(layout.numel, dtype=torch.bool)
    for res in ranks:
        assert res["sharded"] and res["steps"] == ref.step_count
        assert torch.equal(res["alpha"], ranks[0]["alpha"])  # the same alpha on every rank
        torch.testing.assert_close(res["alpha"], ref.alpha, rtol=1e-5, atol=0)
        # theta stays in the shards: this rank's rows of the unsharded theta, nothing more
        assert len(res["theta"]) == len(res["index"]) < layout.numel
        assert torch.equal(res["local"], res["theta"])
        torch.testing.assert_close(res["theta"], ref.theta[res["index"]], rtol=1e-5, atol=1e-6)
        covered[res["index"]] = True
        full = flatten(res["full"], layout)
        torch.testing.assert_close(
            full, flatten(ref_model.state_dict(), layout), rtol=1e-5, atol=1e-6
        )
    assert covered.all()

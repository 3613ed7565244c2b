"""Projection shards in the object store: planning, zero-copy round trip, several shards.

A tiny store: an MLP on MNIST-1D (1,200 samples) trained a few epochs in-process with plain
torch, 6 epoch snapshots.
"""

from __future__ import annotations

import pytest
import ray
import torch
from helpers import make_store, one_thread  # noqa: F401  (one_thread: autouse)

from twa_ray.core.quant import dequantize
from twa_ray.core.twa import TWA, TWAConfig, build_subspace
from twa_ray.models import build_model
from twa_ray.ray.shards import (
    ShardedView,
    block_bytes,
    plan_shards,
    put_subspace,
)

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------------- planning (no Ray)


def test_plan_shards_balanced_and_bounded():
    assert plan_shards([4, 4, 4, 4], max_shard_bytes=8) == (0, 2, 4)
    assert plan_shards([4, 4, 4, 4], max_shard_bytes=100) == (0, 4)
    assert plan_shards([1, 1, 1, 10, 1, 1], num_shards=3) == (0, 3, 4, 6)
    sizes = [3, 7, 2, 9, 4, 4, 1, 8]
    for limit in (9, 10, 12, 20, 38):
        bounds = plan_shards(sizes, max_shard_bytes=limit)
        groups = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
        assert bounds[0] == 0 and bounds[-1] == len(sizes) and sum(groups) == sum(sizes)
        assert max(groups) <= limit
    # a block bigger than the limit gets a shard of its own
    bounds = plan_shards([2, 50, 2], max_shard_bytes=10)
    assert [sum([2, 50, 2][a:b]) for a, b in zip(bounds, bounds[1:])] == [2, 50, 2]
    with pytest.raises(ValueError, match="num_shards"):
        plan_shards([1, 2], num_shards=3)


# ----------------------------------------------------------------------------- round trips


def _check_same(view, core, *, exact):
    torch.manual_seed(1)
    g = torch.randn(core.origin.numel())
    alpha = torch.randn_like(core.alpha0)
    assert torch.equal(view.origin, core.origin) and torch.equal(view.alpha0, core.alpha0)
    assert torch.equal(view.basis.dequantize(), dequantize(core.basis))
    a_view, a_core = view.project(g), core.project(g)
    t_view, t_core = view.reconstruct(alpha), core.reconstruct(alpha)
    out = torch.empty_like(t_core)
    assert view.reconstruct(alpha, out=out) is out and torch.equal(out, t_view)
    if exact:
        assert torch.equal(a_view, a_core) and torch.equal(t_view, t_core)
    else:  # per-shard column chunks may sum in another order
        torch.testing.assert_close(a_view, a_core, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t_view, t_core, rtol=1e-6, atol=1e-6)


def test_one_shard_round_trip_is_zero_copy_and_exact(ray_cluster, tiny):
    store, layout = tiny
    cfg = TWAConfig(bits=4, blocks="tensor")
    sharded = put_subspace(store, layout, cfg)
    core = build_subspace(store, layout, cfg)
    assert sharded.num_shards == 1 and sharded.nbytes == core.basis.nbytes
    assert sharded.coeff_shape == (len(store), layout.blocks("tensor").num_blocks)
    assert sharded.num_candidates == 6 and sharded.bits == 4
    assert sharded.quant_error == tuple(float(e) for e in core.quant_error)

    # the object store hands out read-only views: no copy of B in the reading process
    stored = ray.get(sharded.shard_refs[0])
    assert not stored["arrays"]["data"].flags.writeable

    view = sharded.materialize()
    assert isinstance(view, ShardedView) and view.layout == layout
    assert view.zero_blocks is not None and core.zero_blocks is not None
    assert torch.equal(view.zero_blocks, core.zero_blocks)
    _check_same(view, core, exact=True)


def test_several_shards_match_the_core_subspace(ray_cluster, tiny):
    store, layout = tiny
    cfg = TWAConfig(bits=4, blocks="tensor")
    core = build_subspace(store, layout, cfg)
    sizes = block_bytes(core.basis)
    limit = max(sizes)  # forces several shards, none above the largest block
    sharded = put_subspace(store, layout, cfg, max_shard_bytes=limit)
    assert sharded.num_shards > 1 and max(sharded.shard_nbytes) <= limit
    assert sum(sharded.shard_nbytes) == core.basis.nbytes
    _check_same(sharded.materialize(), core, exact=False)

    three = put_subspace(store, layout, TWAConfig(bits=8, blocks="tensor"), num_shards=3)
    assert three.num_shards == 3
    _check_same(
        three.materialize(),
        build_subspace(store, layout, TWAConfig(bits=8, blocks="tensor")),
        exact=False,
    )


def test_span_subspace_shards(ray_cluster, tiny):
    store, layout = tiny
    cfg = TWAConfig(subspace="span", blocks="model", bits=8)
    sharded = put_subspace(store, layout, cfg)
    assert sharded.kind == "span" and sharded.num_shards == 1
    _check_same(sharded.materialize(), build_subspace(store, layout, cfg), exact=True)


def test_twa_engine_runs_on_a_sharded_view(ray_cluster, tiny):
    """The engine steps on the view exactly as on the in-process subspace (one shard)."""
    store, layout = tiny
    cfg = TWAConfig(bits=4, blocks="tensor", lr=0.05)
    sharded = put_subspace(store, layout, cfg)
    torch.manual_seed(0)
    batches = [(torch.randn(32, 40), torch.randint(0, 10, (32,))) for _ in range(4)]
    alphas = []
    for sub in (sharded.materialize(), build_subspace(store, layout, cfg)):
        torch.manual_seed(0)
        model = build_model("mlp", num_classes=10, input_shape=(40,))
        twa = TWA(model, sub, config=cfg)
        twa.fit(batches, epochs=1)
        alphas.append(twa.alpha.clone())
    assert torch.equal(alphas[0], alphas[1])
    assert not torch.equal(alphas[0], torch.zeros_like(alphas[0]))

"""Basis placement (core): shard equals replicate bit for bit on W gloo processes (no Ray).

A 4-tensor MLP (blocks='tensor': 4 blocks of 130, 10, 33, 3 columns) is cut into 3 shards
(blocks 0:1, 1:3, 3:4); W = 2 and 3 spawned processes train TWA on their own batches with each
placement, at 4 and 32 bits. W = 1 runs in this process.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import spawn_gloo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from twa_ray.core.layout import Layout, flatten
from twa_ray.core.placement import ShardedBasis, balanced_bounds, choose, place
from twa_ray.core.quant import PackedMatrix, rows_aligned
from twa_ray.core.twa import TWA, TWAConfig, build_subspace

SHARDS = (0, 1, 3, 4)  # block offsets of the 3 shards: uneven columns (130 | 43 | 3)
STEPS = 4
BATCH = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def _config(bits: int) -> TWAConfig:
    return TWAConfig(bits=bits, blocks="tensor", lr=0.5, momentum=0.9, schedule="constant")


def _subspace(bits: int):
    model = _model()
    layout = Layout.from_module(model)
    gen = torch.Generator().manual_seed(1)
    base = flatten(model, layout)
    cands = [base + 0.3 * torch.randn(base.shape, generator=gen) for _ in range(5)]
    return build_subspace(cands, layout, _config(bits))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 12, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)


def _train(placement, bits: int, rank: int, device: str = "cpu") -> TWA:
    twa = TWA(_model().to(device), placement, config=_config(bits))
    twa.start(STEPS)
    for step in range(STEPS):
        x, y = _batch(step, rank)
        a, *_ = twa.coefficient_grad((x.to(device), y.to(device)))
        twa.apply_(a)
    return twa


def reference_alpha(bits: int, world: int) -> torch.Tensor:
    """One process: every rank's projected gradient at the same theta, mean in float64."""
    twa = TWA(_model(), _subspace(bits), config=_config(bits))
    twa.start(STEPS)
    for step in range(STEPS):
        parts = [twa.coefficient_grad(_batch(step, r))[0].double() for r in range(world)]
        twa.apply_((sum(parts) / world).float())
    return twa.alpha


def _worker(rank: int, world: int, out: str, device: str = "cpu") -> None:
    res = {}
    for bits in (4, 32):
        sub = _subspace(bits)
        for kind in ("replicate", "shard"):
            p = place(sub, kind, shard_bounds=SHARDS, rank=rank, world=world).to(device)
            twa = _train(p, bits, rank, device)
            res[(bits, kind)] = (twa.alpha.cpu(), p.held_bytes, p.wire_bytes_per_step, p.own_blocks)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module", params=[2, 3])
def spawned(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"w{world}")
    spawn_gloo(_worker, world, out, str(out))
    return world, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow  # spawns 2 and 3 gloo processes (the fast subset starts none)
@pytest.mark.parametrize("bits", [4, 32])
def test_shard_equals_replicate_bitwise(spawned, bits):
    world, ranks = spawned
    ref = reference_alpha(bits, world)
    full = _subspace(bits).basis.nbytes
    for res in ranks:
        rep, shard = res[(bits, "replicate")], res[(bits, "shard")]
        assert torch.equal(shard[0], rep[0]), (shard[0] - rep[0]).abs().max()
        assert torch.equal(rep[0], ranks[0][(bits, "replicate")][0])  # replicas identical
        torch.testing.assert_close(rep[0], ref, rtol=1e-6, atol=0)
        assert not torch.equal(ref, torch.zeros_like(ref))
        assert rep[1] == full and shard[1] < full
    # the shards split B: every byte held once, blocks cover 0:L in order
    assert sum(res[(bits, "shard")][1] for res in ranks) == full
    own = [res[(bits, "shard")][3] for res in ranks]
    assert own[0][0] == 0 and own[-1][1] == 4 and all(a[1] == b[0] for a, b in zip(own, own[1:]))


@pytest.mark.parametrize("bits", [4, 32])
def test_one_worker(bits):
    sub = _subspace(bits)
    a = _train(place(sub, "shard", shard_bounds=SHARDS), bits, 0).alpha
    b = _train(sub, bits, 0).alpha
    assert torch.equal(a, b) and torch.equal(a, reference_alpha(bits, 1))


# ----------------------------------------------------------------------------- planning


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=9), st.integers(1, 9))
def test_balanced_bounds_is_the_best_contiguous_split(sizes, parts):
    parts = min(parts, len(sizes))
    bounds = balanced_bounds(sizes, parts)
    assert len(bounds) == parts + 1 and bounds[0] == 0 and bounds[-1] == len(sizes)
    assert all(a < b for a, b in zip(bounds, bounds[1:]))

    def best(i: int, k: int) -> float:  # smallest max group sum of sizes[i:] in k groups
        if k == 1:
            return sum(sizes[i:])
        return min(max(sum(sizes[i:j]), best(j, k - 1)) for j in range(i + 1, len(sizes) - k + 2))

    got = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert got == best(0, parts)


def test_balanced_bounds_rejects_more_parts_than_items():
    with pytest.raises(ValueError, match="parts"):
        balanced_bounds([1, 2], 3)


def test_choose():
    kw = dict(basis_bytes=400, model_bytes=100, world=2, num_shards=4)
    assert choose("auto", capacity_bytes=1000, **kw)[0] == "replicate"
    kind, why = choose("auto", capacity_bytes=999, **kw)
    assert kind == "shard" and "exceed" in why
    assert choose("auto", capacity_bytes=10, **{**kw, "world": 1})[0] == "replicate"
    assert choose("auto", capacity_bytes=10, **{**kw, "num_shards": 1})[0] == "replicate"
    assert choose("replicate", capacity_bytes=10, **kw) == ("replicate", "requested")
    with pytest.raises(ValueError, match="shard of B per worker"):
        choose("shard", capacity_bytes=10, **{**kw, "num_shards": 1})
    with pytest.raises(ValueError, match="basis_placement"):
        choose("everywhere", capacity_bytes=10, **kw)


def test_config_field():
    assert TWAConfig().basis_placement == "auto"
    with pytest.raises(ValueError, match="basis_placement"):
        TWAConfig(basis_placement="everywhere")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- one copy


def _data_ptrs(placement) -> set[int]:
    return {t.data_ptr() for pm in placement.basis.shards for t in (pm.data, pm.scale, pm.zero)}


def test_padded_rows_reach_the_kernel_aligned_and_are_copied_once():
    """PackedMatrix.to pads rows (the kernels' vector-load layout); moving again is a no-op."""
    from twa_ray.core.kernels import triton_packed as tp

    sub = _subspace(4)
    pm = sub.basis
    assert pm.data.shape[1] % 16 != 0  # unpadded rows: 88 bytes
    padded = pm.to("cpu", pad=True)
    assert padded is not pm and rows_aligned(padded.data) and tp._row_layout(padded.data)[0]
    assert padded.to("cpu", pad=True) is padded and pm.to("cpu") is pm
    g = torch.randn(pm.numel)
    from twa_ray.core.project import project

    assert torch.equal(project(padded, g), project(pm, g))
    # every shard of a ShardedBasis goes through PackedMatrix.to
    sharded = ShardedBasis.split(pm, SHARDS).to("cpu")
    assert all(isinstance(s, PackedMatrix) for s in sharded.shards)
    moved = ShardedBasis([s.to("cpu", pad=True) for s in sharded.shards], sharded.block_bounds)
    assert all(rows_aligned(s.data) for s in moved.shards) and moved.to("cpu") is moved


def test_two_modes_share_one_copy_of_b():
    """TWA-t and TWA-v (two TWA objects, the first still referenced) hold the same bytes of B."""
    sub = _subspace(4)
    placement = place(sub, "replicate")
    t = _train(placement, 4, 0)
    v = TWA(_model(), placement, config=_config(4))
    assert t.placement is placement and v.placement is placement
    assert _data_ptrs(t.placement) == _data_ptrs(v.placement) == _data_ptrs(place(sub, "replicate"))
    held = {p for p in _data_ptrs(t.placement)}
    assert held <= {
        sub.basis.data.data_ptr(),
        sub.basis.scale.data_ptr(),
        sub.basis.zero.data_ptr(),
    }


# ----------------------------------------------------------------------------- on a GPU

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@_CUDA
def test_cuda_one_padded_copy_shared_by_both_modes():
    sub = _subspace(4)
    placement = place(sub, "replicate").to("cuda")
    assert all(rows_aligned(pm.data) for pm in placement.basis.shards)  # what the kernel gets
    assert placement.to("cuda") is placement and placement.to("cuda:0") is placement
    t = _train(placement, 4, 0, "cuda")
    v = TWA(_model().cuda(), placement, config=_config(4))
    assert t.placement is placement and v.placement is placement
    assert _data_ptrs(t.placement) == _data_ptrs(v.placement) == _data_ptrs(placement)


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("world", [2, 3])
def test_cuda_shard_matches_replicate(tmp_path, world):
    """W processes on the one GPU over gloo. The Triton project adds tiles with float atomics
    (order varies from run to run), so the placements agree to float32 rounding, not bitwise."""
    spawn_gloo(_worker, world, tmp_path, str(tmp_path), "cuda")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for bits in (4, 32):
        for res in ranks:
            rep, shard = res[(bits, "replicate")][0], res[(bits, "shard")][0]
            torch.testing.assert_close(shard, rep, rtol=1e-6, atol=1e-7)
            assert torch.equal(rep, ranks[0][(bits, "replicate")][0])  # replicas identical
        torch.testing.assert_close(
            ranks[0][(bits, "shard")][0], reference_alpha(bits, world), rtol=1e-5, atol=1e-6
        )

"""FSDP2 shards (core, no Ray): the sharded basis equals the unsharded one, alpha equals the
data-parallel path's, local shards round-trip.

W = 2 and 4 spawned gloo processes ``fully_shard`` an MLP, a CNN with BatchNorm and a tiny
decoder-only transformer with tied embeddings (dim-0 sizes 7, 3, 2, 6, 11, ... : uneven shards,
and empty ones at W = 4), build the affine subspace from their shards of the candidates
(:func:`build_affine_sharded`) and learn alpha with :class:`ShardedTWA`. This process builds the
unsharded references: :func:`build_affine` and the data-parallel alpha (every rank's projected
gradient at the same theta, mean in float64: the replicate placement's arithmetic,
tests/core/test_placement.py).
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import spawn_gloo
from torch import nn

from twa_ray.core.layout import Blocks, Layout, flatten
from twa_ray.core.quant import PackedMatrix, PackedMatrixBuilder, dequantize, unpack
from twa_ray.core.sharded import LocalShards, chunk_rows, load_local_flat_, local_flat
from twa_ray.core.sharded_span import build_span_sharded
from twa_ray.core.sharded_subspace import ShardedSubspace, build_affine_sharded
from twa_ray.core.sharded_twa import ShardedTWA, build_sharded_subspace
from twa_ray.core.subspace import build_affine, build_span
from twa_ray.core.twa import TWA, TWAConfig, build_subspace

STEPS = 4
BN_BATCHES = 2  # per rank, for update_bn
BATCH = 6
K = 4  # candidates


# ----------------------------------------------------------------------------- models


class Block(nn.Module):
    """Pre-norm causal self-attention (one head) and an MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return h + self.down(F.gelu(self.up(self.ln2(h))))


class TinyLM(nn.Module):
    """A decoder-only transformer, one block, the output head tied to the token embedding."""

    def __init__(self, vocab: int = 11, dim: int = 8, ctx: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(ctx, dim))
        self.block = Block(dim)
        self.ln = nn.LayerNorm(dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.block(self.tok(idx) + self.pos[: idx.shape[1]])
        return F.linear(self.ln(h), self.tok.weight)  # tied head: one parameter


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    name = name.removesuffix("-span")
    if name == "mlp":
        return nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3))
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 5),
        )
    return TinyLM()


def batch(name: str, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    name = name.removesuffix("-span")
    if name == "mlp":
        return torch.randn(BATCH, 12, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)
    if name == "cnn":
        x = torch.randn(BATCH, 3, 8, 8, generator=gen)
        return x, torch.randint(0, 5, (BATCH,), generator=gen)
    seq = torch.randint(0, 11, (BATCH, 7), generator=gen)
    return seq[:, :-1], seq[:, 1:]


LOSS = {"mlp": F.cross_entropy, "cnn": F.cross_entropy, "lm": lm_loss, "lm-span": lm_loss}
CONFIG = {  # blocks / bits / granularity vary with the model
    "mlp": TWAConfig(blocks="tensor", bits=4, lr=0.5, schedule="constant"),
    "cnn": TWAConfig(blocks="tensor", bits=8, granularity="block", lr=0.5, schedule="constant"),
    "lm": TWAConfig(blocks="model", bits=4, lr=0.5, schedule="constant"),
    "lm-span": TWAConfig(subspace="span", blocks="model", bits=32, lr=0.5, schedule="constant"),
}
SPAN_CASES = [(True, 32), (True, 8), (False, 4)]  # (center, bits)
DROPPED = {True: (3, 4), False: (4,)}  # w_4 = (w_0 + w_1) / 2; centered, the deltas sum to 0
BASIS_CASES = [  # (blocks, bits, granularity)
    ("tensor", 4, "row"),
    ("tensor", 2, "block"),
    ("model", 8, "block"),
    ("size:40", 1, "row"),
    ("tensor", 32, "row"),
]


def candidates(name: str) -> tuple[Layout, list[torch.Tensor]]:
    model = make_model(name)  # "lm-span": the lm's candidates and one more
    layout = Layout.from_module(model)
    base = flatten(model, layout)
    gen = torch.Generator().manual_seed(7)
    cands = [base + 0.2 * torch.randn(base.shape, generator=gen) for _ in range(K)]
    if name == "lm-span":  # one candidate on the line of two others: a dropped direction
        cands.append(0.5 * (cands[0] + cands[1]))
    if name == "mlp":  # a block equal in every candidate: zero norms, no direction
        for c in cands:
            c[layout.offsets[-2] :] = base[layout.offsets[-2] :]
    return layout, cands


def codes(pm: PackedMatrix) -> torch.Tensor:
    """The ``(R, D)`` codes (bits <= 8) or values (16/32) of a packed matrix, column order."""
    if pm.bits > 8:
        return pm.data.float()
    parts = [
        unpack(pm.data[:, c0:c1], pm.bits, b - a)
        for a, b, c0, c1 in zip(pm.bounds, pm.bounds[1:], pm.byte_bounds, pm.byte_bounds[1:])
    ]
    return torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 8, 11])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunk_rows_is_torch_chunk(n, world):
    chunks = [len(c) for c in torch.arange(n).chunk(world)]
    chunks += [0] * (world - len(chunks))  # FSDP2 pads missing chunks with empty shards
    assert [b - a for a, b in (chunk_rows(n, world, r) for r in range(world))] == chunks


@pytest.mark.parametrize("world", [1, 2, 4, 5])
def test_local_shards_partition_the_layout(world):
    layout = Layout.from_module(make_model("lm"))
    full = torch.randn(layout.numel)
    index = torch.cat([LocalShards.from_layout(layout, world, r).index() for r in range(world)])
    assert torch.equal(index.sort().values, torch.arange(layout.numel))  # disjoint and complete
    for r in range(world):
        sh = LocalShards.from_layout(layout, world, r)
        assert torch.equal(sh.restrict(full), full[sh.index()]) and sh.numel == len(sh.index())
        for spec in ("model", "tensor", "size:40"):
            blocks = layout.blocks(spec)
            lb = sh.local_blocks(blocks)
            owner = blocks.block_index()[sh.index()]  # the global block of each local column
            for l, (a, b) in enumerate(zip(lb.bounds, lb.bounds[1:])):
                assert bool((owner[a:b] == l).all()) and int((owner == l).sum()) == b - a
            assert lb.held == tuple(l for l in range(blocks.num_blocks) if (owner == l).any())


def test_local_blocks_refuse_cuts_inside_a_parameter():
    layout = Layout.from_module(make_model("mlp"))
    sh = LocalShards.from_layout(layout, 2, 0)
    with pytest.raises(ValueError, match="parameter boundaries"):
        sh.local_blocks(Blocks((0, 5, layout.numel), ("a", "b")))


def test_builder_with_row_ranges_gives_the_same_codes():
    rows = torch.randn(3, 20)
    blocks = Blocks((0, 7, 20), ("a", "b"))
    own = PackedMatrixBuilder(3, blocks, 4)
    lo = torch.stack([torch.stack([r[:7].min(), r[7:].min()]) for r in rows])
    hi = torch.stack([torch.stack([r[:7].max(), r[7:].max()]) for r in rows])
    given = PackedMatrixBuilder(3, blocks, 4, "row", lo=lo, hi=hi)
    for k, r in enumerate(rows):
        own.set_row(k, r)
        given.set_row(k, r)
    a, b = own.finish(), given.finish()
    assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero, b.zero)


def test_sharded_twa_refuses_an_unsharded_subspace():
    model = make_model("mlp")
    layout, cands = candidates("mlp")
    sub = build_affine(lambda: iter(cands), layout, blocks=layout.blocks("tensor"))
    with pytest.raises(ValueError, match="ShardedSubspace"):
        ShardedTWA(model, sub)


def test_one_rank_without_a_group_is_the_unsharded_subspace():
    layout, cands = candidates("cnn")
    sh = LocalShards.from_layout(layout, 1, 0)
    for spec, bits, gran in BASIS_CASES:
        blocks = layout.blocks(spec)
        ref = build_affine(lambda: iter(cands), layout, blocks=blocks, bits=bits, granularity=gran)
        sub = build_affine_sharded(
            lambda: iter(cands), sh, blocks=blocks, bits=bits, granularity=gran
        )
        assert sub.basis is not None and torch.equal(codes(sub.basis), codes(ref.basis))
        torch.testing.assert_close(sub.basis.scale, ref.basis.scale, rtol=1e-6, atol=0)
        alpha = torch.randn(K, blocks.num_blocks)
        g = torch.randn(layout.numel)
        torch.testing.assert_close(
            sub.reconstruct(alpha), ref.reconstruct(alpha), rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(sub.mean_grad(g), ref.project(g), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "lm-span"])
def test_build_sharded_subspace_follows_the_config(name):
    layout, cands = candidates(name)
    ref = build_subspace(cands, layout, CONFIG[name])
    sub = build_sharded_subspace(
        partial(iter, cands), LocalShards.from_layout(layout, 1, 0), CONFIG[name]
    )
    assert (sub.kind, sub.blocks) == (ref.kind, ref.blocks) and sub.dropped == ref.dropped
    assert sub.basis is not None and sub.basis.bits == ref.basis.bits
    sign = row_signs(sub.dequantize(), dequantize(ref.basis))
    torch.testing.assert_close(sub.dequantize(), sign * dequantize(ref.basis), rtol=1e-5, atol=1e-6)


def test_one_rank_span_is_the_unsharded_span_up_to_sign():
    layout, cands = candidates("lm-span")
    sh = LocalShards.from_layout(layout, 1, 0)
    for center, bits in SPAN_CASES:
        ref = build_span(partial(iter, cands), layout, bits=bits, center=center)
        sub = build_span_sharded(partial(iter, cands), sh, bits=bits, center=center)
        sign = row_signs(sub.dequantize(), dequantize(ref.basis))
        assert sub.dropped == ref.dropped == DROPPED[center] and bool((sign.abs() == 1).all())
        torch.testing.assert_close(sub.alpha0, sign * ref.alpha0, rtol=1e-5, atol=1e-6)
        alpha = torch.randn(sub.num_rows, 1)
        torch.testing.assert_close(
            sub.reconstruct(alpha), ref.reconstruct(sign * alpha), rtol=1e-5, atol=1e-5
        )


# ----------------------------------------------------------------------------- W ranks


def _shard_model(model: nn.Module, name: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.block if isinstance(model, TinyLM) else model[0])  # a unit, then the root
    fully_shard(model)
    return model


def basis_inputs() -> dict[str, tuple[Layout, list[torch.Tensor]]]:
    """The three models' candidates, and a layout whose every parameter has fewer rows than
    W = 4 (ranks 2 and 3 hold nothing)."""
    out = {name: candidates(name) for name in ("mlp", "cnn", "lm")}
    tiny = Layout.from_module(nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(3)
    out["tiny"] = (tiny, [torch.randn(tiny.numel, generator=gen) for _ in range(K)])
    return out


def _basis_results(rank: int, world: int) -> dict:
    """This rank's sharded subspaces for every input and BASIS_CASES entry."""
    out = {}
    for name, (layout, cands) in basis_inputs().items():
        sh = LocalShards.from_layout(layout, world, rank)
        local = partial(iter, [sh.restrict(c) for c in cands])
        for spec, bits, gran in BASIS_CASES:
            sub = build_affine_sharded(
                local, sh, blocks=layout.blocks(spec), bits=bits, granularity=gran
            )
            out[(name, spec, bits, gran)] = _record(sub)
    layout, cands = candidates("lm-span")
    sh = LocalShards.from_layout(layout, world, rank)
    shards = [sh.restrict(c) for c in cands]
    local = partial(iter, shards)
    bad = [c.clone() for c in shards]
    if rank == 1:
        bad[2][0] = float("nan")  # one rank's bad candidate: every rank raises, none hangs
    for build in (build_span_sharded, partial(build_affine_sharded, blocks=layout.blocks("model"))):
        with pytest.raises(ValueError, match="NaN" if rank == 1 else "another rank refused"):
            build(partial(iter, bad), sh)
    for center, bits in SPAN_CASES:
        sub = build_span_sharded(local, sh, bits=bits, center=center)
        out[("span", center, bits)] = {
            **_record(sub),
            "deq": sub.dequantize(),
            "alpha0": sub.alpha0,
            "dropped": torch.tensor(sub.dropped),
        }
    return out


def _record(sub: ShardedSubspace) -> dict:
    held = list(sub.local.held)
    rec = {
        "index": sub.shards.index(),
        "origin": sub.origin,
        "held": torch.tensor(held, dtype=torch.int64),
        "points": sub.points,
        "zero_blocks": sub.zero_blocks,
        "quant_error": sub.quant_error,
    }
    if sub.basis is not None:
        rec.update(codes=codes(sub.basis), scale=sub.basis.scale, zero=sub.basis.zero)
    return rec


def _train_sharded(name: str, rank: int, world: int) -> dict:
    layout, cands = candidates(name)
    model = _shard_model(make_model(name), name)
    sh = LocalShards.from_module(model)
    assert sh == LocalShards.from_layout(layout, world, rank)
    v = torch.randn(sh.numel, generator=torch.Generator().manual_seed(rank))
    load_local_flat_(model, v, sh)  # round trip, bitwise
    assert torch.equal(local_flat(model), v)
    cfg = CONFIG[name]
    sub = build_sharded_subspace(partial(iter, [sh.restrict(c) for c in cands]), sh, cfg)
    twa = ShardedTWA(model, sub, config=cfg, loss_fn=LOSS[name])
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # theta(alpha0), for the test
    twa.start(STEPS)
    for step in range(STEPS):
        a, *_ = twa.coefficient_grad(batch(name, step, rank))
        twa.apply_(a)
    bn = {}
    if name == "cnn":  # BatchNorm re-estimated over every rank's batches
        twa.update_bn([batch(name, 100 + i, rank) for i in range(BN_BATCHES)])
        bn = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    return {
        "bn": bn,
        "alpha": twa.alpha,
        "theta": twa.theta,
        "index": sh.index(),
        "theta0": flatten(full, layout),
        "deq": sub.dequantize(),
    }


def _worker(rank: int, world: int, out: str) -> None:
    res = {"basis": _basis_results(rank, world)}
    for name in ("mlp", "cnn", "lm", "lm-span"):
        res[name] = _train_sharded(name, rank, world)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module", params=[2, 4])
def spawned(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"w{world}")
    spawn_gloo(_worker, world, out, str(out))
    return world, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _reference_subspaces() -> dict:
    out = {}
    for name, (layout, cands) in basis_inputs().items():
        for spec, bits, gran in BASIS_CASES:
            out[(name, spec, bits, gran)] = build_affine(
                partial(iter, cands),
                layout,
                blocks=layout.blocks(spec),
                bits=bits,
                granularity=gran,
            )
    return out


@pytest.mark.slow  # spawns 2 and 4 gloo processes
def test_sharded_basis_equals_the_unsharded_basis(spawned):
    world, ranks = spawned
    for key, ref in _reference_subspaces().items():
        ref_codes = codes(ref.basis)
        covered = 0
        for res in ranks:
            rec = res["basis"][key]
            idx, held = rec["index"], rec["held"]
            covered += len(idx)
            assert torch.equal(rec["origin"], ref.origin[idx]), key
            if len(idx) == 0:
                assert "codes" not in rec and len(held) == 0
            else:
                assert torch.equal(rec["codes"], ref_codes[:, idx]), key  # codes bitwise
                torch.testing.assert_close(
                    rec["scale"], ref.basis.scale[:, held], rtol=1e-6, atol=0
                )
                torch.testing.assert_close(rec["zero"], ref.basis.zero[:, held], rtol=1e-6, atol=0)
            torch.testing.assert_close(rec["points"], ref.points, rtol=1e-6, atol=0)
            torch.testing.assert_close(rec["quant_error"], ref.quant_error, rtol=1e-6, atol=1e-12)
            assert torch.equal(rec["zero_blocks"], ref.zero_blocks)
        assert covered == ref.origin.numel()
    assert any(len(res["basis"][("tiny", "tensor", 4, "row")]["index"]) == 0 for res in ranks) == (
        world == 4
    )


def gathered(ranks: list[dict], numel: int) -> torch.Tensor:
    """The full ``(R, D)`` dequantized basis from the ranks' ``deq`` and ``index`` records."""
    out = torch.zeros(ranks[0]["deq"].shape[0], numel)
    for rec in ranks:
        out[:, rec["index"]] = rec["deq"]
    return out


def row_signs(basis: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(R, 1): the sign of each row of ``basis`` against the same row of ``ref``."""
    return torch.sign((basis.double() * ref.double()).sum(dim=1, keepdim=True)).float()


@pytest.mark.slow  # spawns 2 and 4 gloo processes
@pytest.mark.parametrize(("center", "bits"), SPAN_CASES)
def test_sharded_span_equals_the_unsharded_span_up_to_sign(spawned, center, bits):
    world, ranks = spawned
    layout, cands = candidates("lm-span")
    ref = build_span(partial(iter, cands), layout, bits=bits, center=center)
    recs = [res["basis"][("span", center, bits)] for res in ranks]
    ref_deq = dequantize(ref.basis)
    deq = gathered(recs, layout.numel)
    sign = row_signs(deq, ref_deq)
    assert bool((sign.abs() == 1).all()) and ref.dropped == DROPPED[center]
    step = float(ref.basis.scale.max())  # one code step of the coarsest row
    torch.testing.assert_close(deq, sign * ref_deq, rtol=0, atol=1e-6 if bits == 32 else step)
    for rec in recs:
        assert tuple(rec["dropped"].tolist()) == ref.dropped
        assert torch.equal(rec["origin"], ref.origin[rec["index"]])
        torch.testing.assert_close(rec["alpha0"], sign * ref.alpha0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec["points"], sign[None] * ref.points, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec["quant_error"], ref.quant_error, rtol=0.05, atol=1e-9)


def reference_alpha(name: str, world: int) -> tuple[TWA, torch.Tensor]:
    """The data-parallel path in one process: each rank's ``a`` at the same theta, mean in
    float64; returns the TWA object and theta at alpha0."""
    layout, cands = candidates(name)
    twa = TWA(make_model(name), cands, config=CONFIG[name], loss_fn=LOSS[name])
    theta0 = twa.theta.clone()
    twa.start(STEPS)
    for step in range(STEPS):
        parts = [twa.coefficient_grad(batch(name, step, r))[0].double() for r in range(world)]
        twa.apply_((sum(parts) / world).float())
    return twa, theta0


@pytest.mark.slow  # spawns 2 and 4 gloo processes
@pytest.mark.parametrize("name", ["mlp", "cnn", "lm", "lm-span"])
def test_alpha_equals_the_data_parallel_path(spawned, name):
    """The span basis is the unsharded one up to the sign of each row: so is alpha."""
    world, ranks = spawned
    twa, theta0 = reference_alpha(name, world)
    alpha, theta = twa.alpha, twa.theta
    assert alpha.abs().max() > 1e-3  # it moved
    scale = float(alpha.abs().max())
    ref_deq = twa.placement.basis.dequantize()
    sign = row_signs(gathered([res[name] for res in ranks], ref_deq.shape[1]), ref_deq)
    assert name == "lm-span" or bool((sign == 1).all())
    for res in ranks:
        r = res[name]
        torch.testing.assert_close(sign * r["alpha"], alpha, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(r["theta"], theta[r["index"]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["theta0"], theta0, rtol=1e-6, atol=1e-7)
        assert torch.equal(r["alpha"], ranks[0][name]["alpha"])  # every rank steps the same alpha
    if name == "cnn":  # the statistics of one update_bn over the union of the ranks' batches
        twa.update_bn([batch(name, 100 + i, r) for r in range(world) for i in range(BN_BATCHES)])
        ref = {n: b for n, b in twa.model.named_buffers() if "running" in n}
        assert set(ref) == {"1.running_mean", "1.running_var"}
        for res in ranks:
            for n, b in ref.items():
                torch.testing.assert_close(res[name]["bn"][n], b, rtol=1e-5, atol=1e-6)

"""Sharded candidates (FSDP2's dim-0 shards, one part per rank): round trip, resharding,
completeness and corruption, without Ray or a process group."""

import pytest
import torch

from twa_ray.core.layout import Layout, flatten
from twa_ray.store import CandidateStore
from twa_ray.store.sharded import dim0_rows, part_file


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(7, 3, generator=g),  # 7 rows over 4 ranks: 2, 2, 2, 1
        "conv.weight": torch.randn(5, 2, 3, generator=g).half(),
        "norm.weight": torch.randn(3, generator=g).bfloat16(),  # rank 3 holds no row
        "head.bias": torch.randn(2, generator=g),  # ranks 2 and 3 hold none
        "scale": torch.randn((), generator=g),  # 0-d: rank 0's
    }


def _local(state: dict[str, torch.Tensor], layout: Layout, rank: int, world: int) -> torch.Tensor:
    """What an FSDP2 rank holds: its rows of every parameter, flattened in layout order."""
    rows = dim0_rows(layout, rank, world)
    parts = [
        (t.reshape(1) if t.dim() == 0 else t)[a:b].float().reshape(-1)
        for t, (a, b) in zip(state.values(), rows, strict=True)
    ]
    return torch.cat(parts)


def _write_sharded(store, state, layout, world, *, name="step00000010", ranks=None):
    for r in range(world) if ranks is None else ranks:
        store.write_part(_local(state, layout, r, world), layout, name=name, rank=r, world=world)
    return name


@pytest.fixture
def store(tmp_path) -> CandidateStore:
    return CandidateStore(tmp_path / "store", create=True)


def test_dim0_rows_follow_torch_chunk():
    layout = Layout.from_tensors(_state())
    for world in (1, 2, 3, 4, 8):
        for i, shape in enumerate(layout.shapes):
            n = shape[0] if shape else 1
            chunks = torch.arange(n).chunk(world)
            got = [dim0_rows(layout, r, world)[i] for r in range(world)]
            want = [(int(c[0]), int(c[-1]) + 1) for c in chunks] + [(n, n)] * (world - len(chunks))
            assert got == want, (shape, world)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_round_trip_bitwise(store, world):
    state = _state(1)
    layout = Layout.from_tensors(state)
    name = _write_sharded(store, state, layout, world)
    assert name not in store.names()  # parts alone are no candidate
    store.commit_parts(name, layout, world, step=10, epoch=1.0, run_id="r", source="sampling")
    assert store.names() == [name]
    info = store.info(name)
    assert (info.step, info.epoch, info.run_id, info.source) == (10, 1.0, "r", "sampling")
    assert store.layout.fingerprint == layout.fingerprint
    assert torch.equal(store.read(name), flatten(state, layout))
    back = store.read_state(name)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    for r in range(world):  # each rank reads its own part back
        assert torch.equal(store.read_local(name, r, world), _local(state, layout, r, world))


def test_reshard_4_to_2_and_to_flat(store):
    state = _state(2)
    layout = Layout.from_tensors(state)
    name = _write_sharded(store, state, layout, 4)
    store.commit_parts(name, layout, 4, step=10)
    for world in (1, 2, 3):
        for r in range(world):
            assert torch.equal(store.read_local(name, r, world), _local(state, layout, r, world))
    flat = store.write(state, layout, step=20)  # a flat candidate reads as shards too
    assert torch.equal(store.read_local(flat, 1, 2), _local(state, layout, 1, 2))


def test_missing_part_is_never_listed(store):
    state = _state(3)
    layout = Layout.from_tensors(state)
    name = _write_sharded(store, state, layout, 4, ranks=[0, 1, 3])
    with pytest.raises(FileNotFoundError, match="misses rank 2's part"):
        store.commit_parts(name, layout, 4, step=10)
    assert store.names() == [] and name not in store


def test_part_of_another_world_or_model_is_refused(store):
    state = _state(4)
    layout = Layout.from_tensors(state)
    _write_sharded(store, state, layout, 2)
    other = Layout.from_tensors({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        store.write_part(torch.zeros(5), layout, name="x", rank=0, world=2)
    with pytest.raises(ValueError, match="not rank 0 of 2's part"):
        CandidateStore(store.uri).commit_parts("step00000010", other, 2, step=10)


def test_corrupt_or_deleted_part_fails_the_read(store):
    state = _state(5)
    layout = Layout.from_tensors(state)
    name = _write_sharded(store, state, layout, 2)
    store.commit_parts(name, layout, 2, step=10)
    path = store._local + "/" + part_file(name, 1, 2)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the values (or the footer)
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="corrupt|cannot read"):
        store.read(name)
    import os

    os.unlink(path)
    with pytest.raises(FileNotFoundError, match="misses rank 1's part"):
        store.read(name)


def test_nonfinite_part_is_refused(store):
    state = _state(6)
    layout = Layout.from_tensors(state)
    local = _local(state, layout, 0, 2)
    local[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        store.write_part(local, layout, name="s", rank=0, world=2)


def _snapshot_rank(rank: int, world: int, store_uri: str) -> None:
    """One gloo rank: an FSDP2 model snapshotted with the public ``twa_ray.snapshot``."""
    import torch.distributed as dist

    import twa_ray
    from twa_ray.ray.fsdp import shard_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)
    )
    shard_model(model, torch.device("cpu"))
    name = twa_ray.snapshot(model, store_uri, step=7, epoch=1.0, run_id="r")
    assert (name is not None) == (rank == 0)
    dist.barrier()
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    store = CandidateStore(store_uri)
    layout = Layout.from_tensors(full)
    assert store.names() == ["step00000007"] and store.info("step00000007").run_id == "r"
    assert torch.equal(store.read("step00000007"), flatten(full, layout))
    assert torch.equal(
        store.read_local("step00000007", rank, world), _local(full, layout, rank, world)
    )


def test_public_snapshot_of_an_fsdp2_model_writes_its_shards(tmp_path):
    """Two gloo processes ``fully_shard`` a model; ``twa_ray.snapshot`` on each writes its
    rows (no gather): the candidate reads back as the full weights, and each rank's rows."""
    from helpers import spawn_gloo

    store = tmp_path / "store"
    spawn_gloo(_snapshot_rank, 2, tmp_path, str(store))
    assert sorted(p.name for p in (store / "step00000007.parts").iterdir()) == [
        "part-00000-of-00002.arrow",
        "part-00001-of-00002.arrow",
    ]

"""Basis placement on the real local Ray: 'shard' learns the alpha of 'replicate'.

run_twa (TWA-t, 4-5 steps) on 1, 2 and 3 CPU workers over gloo, at 4 and 32 bits, against the
same steps emulated in this process (every rank's batch from its DistributedSampler, the
projected gradients averaged in float64 as the workers do), and against 'replicate' runs. The
MNIST-1D MLP with blocks='tensor' has 8 blocks of uneven size (10240, 256, 256, 65536, 256, 256,
2560, 10 columns) in 4 shards: the workers own uneven block and column ranges.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import make_store, one_thread, store_data  # noqa: F401  (one_thread: autouse)
from test_one_loop import library_alpha  # tests/ray is on sys.path
from torch.utils.data import DistributedSampler

from twa_ray.core.twa import TWA, TWAConfig
from twa_ray.data import load_dataset
from twa_ray.models import build_model
from twa_ray.ray.coeff_group import CoeffGroupConfig, run_twa
from twa_ray.ray.shards import put_subspace

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

SAMPLES = 600
BATCH = 60


def _cfg(bits: int, placement: str) -> TWAConfig:
    return TWAConfig(bits=bits, blocks="tensor", lr=0.1, epochs=0.5, basis_placement=placement)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    store, layout = make_store(root, num_samples=SAMPLES, epochs=4)
    data = store_data(root, SAMPLES)
    # one object-store copy per bits, 4 shards: every placement reads the same shards
    sharded = {b: put_subspace(store, layout, _cfg(b, "shard"), num_shards=4) for b in (4, 32)}
    return root, data, sharded


@pytest.fixture(scope="module")
def runs(setup):
    """``run(workers, bits, placement)``, each run once per module."""
    root, data, sharded = setup
    done: dict = {}

    def run(workers: int, bits: int, placement: str):
        key = (workers, bits, placement)
        if key not in done:
            group = CoeffGroupConfig(
                modes=("t",),
                num_workers=workers,
                cpus_per_worker=2 / 3 if workers == 3 else 1.0,
                batch_size=BATCH,
                max_failures=0,
                eval_swa=False,
                progress=False,
            )
            res = run_twa(
                sharded[bits],
                data,
                _cfg(bits, placement),
                group,
                run_dir=str(root / "_".join(map(str, key))),
            )
            done[key] = res["t"]
        return done[key]

    return run


def reference_alpha(setup, workers: int, bits: int, steps: int) -> torch.Tensor:
    _, data, sharded = setup
    splits = load_dataset("mnist1d", root=data.data_root, num_samples=SAMPLES, val_frac=0.1)
    ds = splits.train
    torch.manual_seed(data.seed)
    model = build_model("mlp", num_classes=splits.num_classes, input_shape=splits.input_shape)
    twa = TWA(model, sharded[bits].materialize(), config=_cfg(bits, "replicate"))
    twa.start(steps)
    per_worker = BATCH // workers
    samplers = [
        DistributedSampler(ds, num_replicas=workers, rank=r, shuffle=True, seed=data.seed)
        for r in range(workers)
    ]
    for epoch in itertools.count():
        orders = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        for i in range(len(orders[0]) // per_worker):
            parts = []
            for order in orders:
                items = [ds[j] for j in order[i * per_worker : (i + 1) * per_worker]]
                x, y = torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
                parts.append(twa.coefficient_grad((x, y))[0].double())
            twa.apply_((sum(parts) / workers).float())
            if twa.step_count == steps:
                return twa.alpha
    raise AssertionError("unreachable")


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("bits", [4, 32])
def test_shard_learns_the_reference_alpha(setup, runs, workers, bits):
    shard = runs(workers, bits, "shard")
    assert shard.steps >= 4 and shard.alpha_identical
    ref = reference_alpha(setup, workers, bits, shard.steps)
    assert not torch.equal(ref, torch.zeros_like(ref))
    torch.testing.assert_close(shard.alpha, ref, rtol=1e-6, atol=0)
    total = setup[2][bits].nbytes
    if workers == 1:
        assert shard.extra["basis_placement"] == "replicate"  # one worker holds all of B
        assert shard.extra["basis_held_bytes"] == total and shard.extra["wire_bytes_per_step"] == 0
    else:
        assert shard.extra["basis_placement"] == "shard"
        assert shard.extra["basis_placement_reason"] == "requested"
        assert 0 < shard.extra["basis_held_bytes"] < total  # rank 0 holds its shards only


@pytest.mark.parametrize("bits", [4, 32])
def test_shard_equals_replicate_on_three_workers(runs, bits):
    rep, shard = runs(3, bits, "replicate"), runs(3, bits, "shard")
    assert torch.equal(shard.alpha, rep.alpha)  # bit for bit (deterministic CPU kernels)
    assert rep.extra["basis_placement"] == "replicate" and rep.alpha_identical
    assert shard.extra["wire_bytes_per_step"] > rep.extra["wire_bytes_per_step"] > 0
    assert shard.test_acc == rep.test_acc and shard.val_loss == rep.val_loss


def test_auto_replicates_a_small_basis(runs):
    auto, shard = runs(2, 4, "auto"), runs(2, 4, "shard")
    assert auto.extra["basis_placement"] == "replicate"
    assert "fit in" in auto.extra["basis_placement_reason"]
    assert "object store" in auto.extra["basis_placement_reason"]
    assert torch.equal(auto.alpha, shard.alpha)


def test_library_fit_on_two_gloo_processes_learns_the_ray_group_alpha(setup, runs, tmp_path):
    """The same loop across two workers: ``TWA.fit`` on a gloo group of two processes (each its
    ShuffledBatches share) against the 2-worker Ray Train group's run."""
    root, data, _ = setup
    ray2 = runs(2, 4, "auto")
    alpha = library_alpha(tmp_path, 2, str(root / "store"), data, _cfg(4, "replicate"), BATCH)
    torch.testing.assert_close(ray2.alpha, alpha, rtol=1e-6, atol=0)

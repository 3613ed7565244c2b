"""One coefficient loop: the four entry points learn the same alpha.

Same candidates (a tiny MNIST-1D MLP store), data order (``ShuffledBatches``, seed 0) and
config: the library's ``TWA.fit``, ``twa-ray average``'s ``fit_twa``, a Tune trial's loop and
the Ray Train coefficient group end bit for bit at the same alpha on one worker. On two workers
(tests/ray/test_coeff_placement.py, reusing its runs) the Ray Train group and ``TWA.fit`` in two
torch.distributed (gloo) processes (:func:`library_alpha`) agree within rtol 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_store, one_thread, spawn_gloo, store_data  # noqa: F401  (one_thread: autouse)

from twa_ray.average import fit_twa, make_loaders
from twa_ray.config import DataConfig, RunConfig, SamplingConfig
from twa_ray.core.layout import Layout
from twa_ray.core.loop import ShuffledBatches, steps_per_epoch
from twa_ray.core.placement import place
from twa_ray.core.twa import TWA, TWAConfig, build_subspace
from twa_ray.data import load_dataset
from twa_ray.models import build_model
from twa_ray.ray.coeff_group import CoeffGroupConfig, run_twa
from twa_ray.ray.shards import put_subspace
from twa_ray.ray.tune_trial import trial_loop
from twa_ray.tune_plan import PlannedTrial

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

SAMPLES = 600
BATCH = 60
# the loop itself (from SWA, the last step kept): TWA.fit has no held-out data to choose with
TWA_CFG = TWAConfig(bits=4, blocks="tensor", lr=0.1, epochs=1.0, start="swa", keep_best=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_loop")
    store, layout = make_store(root, num_samples=SAMPLES, val_frac=0.1, epochs=3)
    data = store_data(root, SAMPLES)
    return root, store, layout, data


def _splits(data):
    return load_dataset(
        data.dataset,
        root=data.data_root,
        num_samples=data.num_samples,
        val_frac=data.val_frac,
        seed=data.seed,
    )


def _model(data, splits):
    torch.manual_seed(data.seed)
    return build_model(data.model, num_classes=splits.num_classes, input_shape=splits.input_shape)


def _library_fit(setup) -> torch.Tensor:
    _, store, layout, data = setup
    splits = _splits(data)
    twa = TWA(_model(data, splits), store, config=TWA_CFG)
    twa.fit(ShuffledBatches(splits.train, BATCH, seed=data.seed))
    return twa.alpha.clone()


def _average(setup) -> torch.Tensor:
    _, store, layout, data = setup
    splits = _splits(data)
    model = _model(data, splits)
    subspace = build_subspace(store, Layout.from_module(model), TWA_CFG)
    twa, accs = fit_twa(
        model, subspace, TWA_CFG, make_loaders(splits, BATCH, data.seed), "t", seed=data.seed
    )
    assert set(accs) == {"val_acc", "test_acc"}
    return twa.alpha.clone()


def _tune_trial(setup) -> torch.Tensor:
    root, store, _, data = setup
    cfg = RunConfig(data=data, sampling=SamplingConfig(batch_size=BATCH), twa=TWA_CFG, mode="t")
    trial = PlannedTrial(index=0, params={}, config=cfg, group="g", candidates=tuple(store.names()))
    reports: list = []
    loop = trial_loop(
        cfg,
        trial,
        store=str(root / "store"),
        select_frac=0.5,
        device=torch.device("cpu"),
        report=lambda metrics, state: reports.append((metrics, state)),
    )
    loop.run()
    assert [m["finished"] for m, _ in reports] == [True]  # one epoch, reported once
    assert torch.equal(reports[-1][1].twa["alpha"], loop.twa.alpha)  # the checkpointed state
    return loop.twa.alpha.clone()


def _ray_group(setup, workers: int):
    root, store, layout, data = setup
    group = CoeffGroupConfig(
        modes=("t",),
        num_workers=workers,
        batch_size=BATCH,
        max_failures=0,
        eval_swa=False,
        progress=False,
    )
    sharded = put_subspace(store, layout, TWA_CFG)
    return run_twa(sharded, data, TWA_CFG, group, run_dir=str(root / f"ray{workers}"))["t"]


def test_four_entry_points_learn_the_same_alpha_on_one_worker(setup):
    _, _, _, data = setup
    ray1 = _ray_group(setup, 1)
    per_epoch = steps_per_epoch(len(_splits(data).train), BATCH)
    assert ray1.steps == ray1.steps_per_epoch == per_epoch  # epochs=1
    alphas = {
        "library": _library_fit(setup),
        "average": _average(setup),
        "tune": _tune_trial(setup),
    }
    assert not torch.equal(ray1.alpha, torch.zeros_like(ray1.alpha))  # it moved off SWA
    for host, alpha in alphas.items():
        assert torch.equal(alpha, ray1.alpha), host


def gloo_fit(
    rank: int,
    world: int,
    store: str,
    data: DataConfig,
    cfg: TWAConfig,
    batch: int,
    out: str,
) -> None:
    """``TWA.fit`` as rank ``rank`` of a gloo group of ``world`` processes (the library across
    workers): its share of every batch, ``a`` averaged by the placement; rank 0 saves alpha."""
    from twa_ray.store.store import CandidateStore

    splits = _splits(data)
    model = _model(data, splits)
    subspace = build_subspace(CandidateStore(store), Layout.from_module(model), cfg)
    twa = TWA(model, place(subspace, "replicate", rank=rank, world=world), config=cfg)
    twa.fit(
        ShuffledBatches(splits.train, batch, rank=rank, world=world, seed=data.seed),
        steps_per_epoch=steps_per_epoch(len(splits.train), batch, world),
    )
    if rank == 0:
        torch.save(twa.alpha.clone(), out)


def library_alpha(
    tmp_path, world: int, store: str, data: DataConfig, cfg: TWAConfig, batch: int
) -> torch.Tensor:
    """:func:`gloo_fit` in ``world`` spawned processes; rank 0's alpha."""
    out = str(tmp_path / "alpha.pt")
    spawn_gloo(gloo_fit, world, tmp_path, store, data, cfg, batch, out)
    return torch.load(out, weights_only=True)

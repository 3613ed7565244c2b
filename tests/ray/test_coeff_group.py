"""The coefficient phase on 2 Ray Train workers (real local Ray, 2 CPUs).

MNIST-1D with 1,200 samples and val_frac 0.2 -> 768 train / 192 val / 240 test; a global batch of
64 on 2 workers (32 each, drop_last) gives 12 TWA-t steps and 3 TWA-v steps per epoch.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from test_shards import make_store, one_thread  # noqa: F401  (tests/ray is on sys.path)

from twa_ray.config import DataConfig
from twa_ray.core.bn import bn_state, update_bn
from twa_ray.core.layout import load_flat_
from twa_ray.core.twa import TWAConfig
from twa_ray.data import load_dataset
from twa_ray.models import build_model
from twa_ray.ray.coeff_group import run_twa, strided
from twa_ray.ray.shards import put_subspace

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

BATCH = 64
WORKERS = 2
TWA_CFG = TWAConfig(bits=4, blocks="tensor", lr=0.05, epochs=1.0)
VAL_FRAC = 0.2
CHECKPOINT_EVERY = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("coeff")
    store, layout = make_store(root, val_frac=VAL_FRAC)
    data = DataConfig(
        dataset="mnist1d", num_samples=1200, val_frac=VAL_FRAC, model="mlp", data_root=str(root / "cache")
    )
    return data, put_subspace(store, layout, TWA_CFG, num_shards=2)


def _run(setup, run_dir, **kw):
    data, sharded = setup
    base = dict(num_workers=WORKERS, cpus_per_worker=1.0, batch_size=BATCH, max_failures=0,
                checkpoint_every=CHECKPOINT_EVERY, progress=False)  # fmt: skip
    return run_twa(sharded, data, TWA_CFG, run_dir=str(run_dir), **{**base, **kw})


@pytest.fixture(scope="module")
def both(setup, tmp_path_factory):
    """TWA-t and TWA-v, uninterrupted: the reference of the failure test."""
    return _run(setup, tmp_path_factory.mktemp("both"), modes=("t", "v"), run_id="both")


def test_both_modes_run_and_agree_across_workers(setup, both):
    _, sharded = setup
    k, num_blocks = sharded.coeff_shape
    assert set(both) == {"t", "v"}
    for mode, res in both.items():
        assert res.mode == mode and res.num_workers == WORKERS
        assert res.bytes_allreduced_per_step == k * num_blocks * 4
        assert res.alpha_identical
        assert tuple(res.alpha.shape) == (k, num_blocks) and torch.isfinite(res.alpha).all()
        assert not torch.equal(res.alpha, torch.zeros_like(res.alpha))  # it moved off SWA
        for key in ("val_loss", "val_acc", "test_loss", "test_acc"):
            assert math.isfinite(getattr(res, key)) and math.isfinite(res.swa[key])
        assert res.steps == round(TWA_CFG.epochs * res.steps_per_epoch)
        assert [h["step"] for h in res.history] == [
                    res.steps_per_epoch * (e + 1) for e in range(int(TWA_CFG.epochs))
        ]
        assert all(math.isfinite(h["loss"]) for h in res.history)
        assert res.restarts == 0 and os.path.isdir(res.checkpoint_path)
    assert (both["t"].steps_per_epoch, both["v"].steps_per_epoch) == (12, 3)
    assert both["t"].swa == both["v"].swa  # the SWA point is evaluated once, reported with both
    # TWA-v optimizes the val loss itself: it ends at or below the SWA point's
    assert both["v"].val_loss <= both["v"].swa["val_loss"] + 1e-6


def test_bn_statistics_equal_one_update_over_all_shards(setup, both):
    """The all-reduced BN statistics equal a single-process update_bn over the union of the
    workers' batches (each worker: its strided train shard, batches of BATCH // WORKERS)."""
    data, sharded = setup
    res = both["t"]
    splits = load_dataset(
        "mnist1d", root=data.data_root, num_samples=data.num_samples, val_frac=data.val_frac
    )
    model = build_model("mlp", num_classes=splits.num_classes, input_shape=splits.input_shape)
    load_flat_(model, res.theta(sharded), sharded.layout)
    loaders = [
        torch.utils.data.DataLoader(strided(splits.train, r, WORKERS), batch_size=BATCH // WORKERS)
        for r in range(WORKERS)
    ]
    update_bn(itertools.chain(*loaders), model)
    torch.testing.assert_close(res.bn_state, bn_state(model), rtol=1e-5, atol=1e-6)

    # and the result loads back into a fresh model with the workers' test accuracy
    from twa_ray.core.evaluate import evaluate

    fresh = res.load_into_(build_model("mlp", num_classes=10, input_shape=(40,)), sharded)
    acc = evaluate(fresh, torch.utils.data.DataLoader(splits.test, batch_size=256)).acc
    assert acc == pytest.approx(res.test_acc, abs=1e-9)


def test_failure_resumes_from_the_coefficient_checkpoint(setup, both, tmp_path):
    """A worker dies once after step 6 (last checkpoint: step 4); the group restarts from the
    checkpoint, replays steps 5-6 on the same batches and ends where the uninterrupted run did."""
    res = _run(setup, tmp_path, modes=("t",), run_id="fail", max_failures=1, fail_at_step=6,
               eval_swa=False)["t"]  # fmt: skip
    assert os.path.exists(tmp_path / ".twa_fail.failure_injected")
    assert res.restarts == 1 and res.alpha_identical
    ref = both["t"]
    assert res.steps == ref.steps
    torch.testing.assert_close(res.alpha, ref.alpha, rtol=1e-5, atol=1e-6)
    assert res.test_acc == pytest.approx(ref.test_acc, abs=2 / 240)
    assert [h["step"] for h in res.history] == [h["step"] for h in ref.history]
    for h, g in zip(res.history, ref.history):
        assert h["loss"] == pytest.approx(g["loss"], rel=1e-4)

"""The public API for any Ray Train loop (:mod:`twa_ray.train`): ``snapshot`` and ``learn``, and
examples/ray_train_loop.py run at tiny size on the module's shared Ray."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import twa_ray.train
from twa_ray.core.layout import Layout, flatten
from twa_ray.core.twa import TWA
from twa_ray.store import CandidateStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_train_loop.py"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _sgd_candidates(
    store: str, steps: int = 12, every: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SGD on random data, a snapshot every ``every`` steps; returns the batches."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
        for _ in range(steps)
    ]
    for step, (x, y) in enumerate(batches, 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            assert (
                twa_ray.train.snapshot(model, store, step=step, epoch=step / 4, run_id="r")
                == f"step{step:08d}"
            )
    return batches


def test_snapshot_is_idempotent_by_step(tmp_path):
    store_uri = str(tmp_path / "store")
    model = _net()
    assert twa_ray.train.snapshot(model, store_uri, step=5, run_id="r", seed=3) == "step00000005"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    # the same step again (a replayed step after a restart): replaced, not duplicated
    assert (
        twa_ray.train.snapshot(model, store_uri, step=5, epoch=1.25, run_id="r", seed=3)
        == "step00000005"
    )
    store = CandidateStore(store_uri)
    assert store.names() == ["step00000005"]
    assert torch.equal(store.read("step00000005"), flatten(model, Layout.from_module(model)))
    info = store.info("step00000005")
    assert (info.step, info.epoch, info.run_id, info.seed, info.source) == (
        5,
        1.25,
        "r",
        3,
        "snapshot",
    )
    # another run may not overwrite it
    with pytest.raises(ValueError, match="belongs to run 'r'"):
        twa_ray.train.snapshot(model, store_uri, step=5, run_id="other")


def test_learn_is_the_core_engine(tmp_path):
    """``learn`` = ``TWA(model, store).fit(loader)``: the same coefficients bit for bit, and the
    model left at ``theta(alpha)``."""
    store_uri = str(tmp_path / "store")
    batches = _sgd_candidates(store_uri)
    assert CandidateStore(store_uri).names() == [f"step{s:08d}" for s in (3, 6, 9, 12)]
    model = _net()
    twa = twa_ray.train.learn(model, store_uri, batches, bits=8, lr=0.1, steps=7)
    ref = TWA(_net(), CandidateStore(store_uri), bits=8, lr=0.1).fit(batches, steps=7)
    assert twa.step_count == ref.step_count == 7
    assert torch.equal(twa.alpha, ref.alpha) and not torch.equal(
        twa.alpha, torch.zeros_like(twa.alpha)
    )
    assert torch.equal(flatten(model, Layout.from_module(model)), twa.theta)
    CandidateStore(str(tmp_path / "empty"), create=True)
    with pytest.raises(ValueError, match="is empty"):
        twa_ray.train.learn(_net(), str(tmp_path / "empty"), batches)


def test_import_needs_neither_ray_nor_integrations():
    code = (
        "import sys, twa_ray.train; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'lightning', 'pytorch_lightning', 'transformers'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.ray
@pytest.mark.slow
def test_example_runs_at_tiny_size(ray_cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("ray_train_loop_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(example)  # the workers cannot import examples/
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        args = ["--out", str(tmp_path), "--epochs", "4", "--samples", "800", "--every", "5"]
        assert example.main(args) == 0
    # 480 train examples, 2 workers x 16 per step (drop_last): 7 steps per epoch, 2 epochs
    store = CandidateStore(str(tmp_path / "candidates"))
    assert store.names() == ["step00000005", "step00000010", "step00000014"]
    assert {store.info(n).run_id for n in store.names()} == {"ray_train_loop"}
    text = printed.getvalue()
    assert "3 candidates" in text and "TWA-v" in text

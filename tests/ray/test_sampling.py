"""Sampling on a real local Ray cluster (2 CPUs): candidates, intervals, fault tolerance, Snapshotter.

MNIST-1D with 1,200 samples -> 864 train / 96 val / 240 test; a global batch of 128 on 2 workers
(64 each, drop_last) gives 6 steps per epoch; epochs=4 with sample_frac=0.5 trains 2 epochs.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from helpers import TorchWatch

from twa_ray.config import DataConfig, SamplingConfig
from twa_ray.core.layout import Layout, flatten
from twa_ray.core.optim import lr_factor
from twa_ray.data import held_out_split, load_dataset
from twa_ray.models import build_model
from twa_ray.ray.group import CheckpointClock, PhaseTimer
from twa_ray.ray.sampling import run_sampling
from twa_ray.store.snapshots import Snapshotter, candidate_name
from twa_ray.store.store import CandidateStore

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


STEPS_PER_EPOCH = 6  # 432 train examples per worker // 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    cache = tmp_path_factory.mktemp("mnist1d_cache")
    # generate once here (mnist1d takes seconds): the workers then read the cached arrays
    load_dataset("mnist1d", root=str(cache), num_samples=1200)
    return DataConfig(dataset="mnist1d", num_samples=1200, model="mlp", data_root=str(cache))


def _sampling(**kw) -> SamplingConfig:
    # a checkpoint at every epoch end (the failure tests resume from given epochs)
    base = dict(
        epochs=4,
        sample_frac=0.5,
        batch_size=128,
        lr=0.05,
        num_workers=2,
        cpus_per_worker=1.0,
        max_failures=0,
        checkpoint_interval_s=0,
    )
    return SamplingConfig(**{**base, **kw})


def _run(data, sampling, tmp, run_id, **kw):
    return run_sampling(
        data, sampling, store_uri=str(tmp / "store"), run_dir=str(tmp / "run"), run_id=run_id, **kw
    )


@pytest.fixture(scope="module")
def step_run(data, tmp_path_factory):
    """An uninterrupted run snapshotting every 5 steps: the reference of the failure test."""
    tmp = tmp_path_factory.mktemp("step_run")
    res = _run(data, _sampling(sample_interval=5, interval_unit="step"), tmp, "steps")
    return res, CandidateStore(str(tmp / "store"))


def test_epoch_interval_candidates(data, tmp_path):
    # checkpoints at most once an hour: only the last epoch's (forced), and a complete history
    sampling = _sampling(sample_interval=1, interval_unit="epoch", checkpoint_interval_s=3600)
    with TorchWatch(b"ray::TrainController") as controllers:
        res = _run(data, sampling, tmp_path, "epochs")
    store = CandidateStore(str(tmp_path / "store"))
    ckpts = sorted(
        p.name
        for p in (tmp_path / "run" / "ray_train" / "sampling_epochs").glob("checkpoint_epoch*")
    )
    assert ckpts == ["checkpoint_epoch0002"]
    # the checkpoint says its phase, what is done and rank 0's seconds per part so far
    last = tmp_path / "run" / "ray_train" / "sampling_epochs" / ckpts[-1]
    phase = json.loads((last / "phase.json").read_text())
    assert phase["phase"] == "sampling" and phase["done"] == {"epochs": 2}
    assert {"setup", "compute", "evaluation", "snapshot_io"} <= {
        k.split("/")[1] for k in phase["wall_s"]
    }

    # one candidate per sampled epoch, named by the global step, increasing
    steps = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert res.candidates == [candidate_name(s) for s in steps] == store.names()
    infos = [store.info(n) for n in store.names()]
    assert [i.step for i in infos] == steps
    assert [i.epoch for i in infos] == [1.0, 2.0]
    assert {(i.run_id, i.source, i.seed) for i in infos} == {("epochs", "sampling", 0)}

    # the stored layout is build_model's (unwrapped from DDP: no 'module.' prefix)
    model = build_model("mlp", num_classes=10, input_shape=(40,))
    layout = store.layout
    assert layout is not None and layout.fingerprint == Layout.from_module(model).fingerprint

    # a fit on a Ray this process started, with no Ray Datasets, started none of Ray Train's
    # helper actors that it would not use (ray_internals.torch_trainer)
    from ray._private.state import actors

    started = {a["ActorClassName"] for a in actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= started, started
    unused = {"DatasetManager", "PlacementGroupCleaner", "_AutoscalingCoordinatorActor"}
    assert not unused & started, started
    # ... and its controller ran without torch (ray_internals._torch_config)
    assert controllers.seen and not any(controllers.seen.values()), controllers.seen

    # history, sizes, the final candidate is the final SGD weights (== the checkpoint's model)
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert [h["step"] for h in res.history] == steps
    fm = res.final_metrics
    assert (fm["steps_per_epoch"], fm["total_steps"], fm["num_candidates"]) == (6, 24, 2)
    assert (fm["num_train"], fm["num_val"]) == (864, 96)
    assert (
        fm["test_acc"] > 0.15 and fm["val_acc"] > 0.15
    )  # learns something in 12 steps (chance 0.1)
    # the schedule spans the full 24 steps (a schedule over the 12 trained would have decayed)
    for h in res.history:
        assert h["lr"] == pytest.approx(
            sampling.lr * lr_factor(h["step"] - 1, 24, schedule=sampling.schedule)
        )
    final = res.read_final()
    assert torch.equal(final, flatten(res.read_final_state(), layout))
    assert os.path.isdir(res.checkpoint_path)
    assert os.path.exists(tmp_path / "run" / "sampling_epochs.json")

    # val is never trained on: the split is a disjoint seeded hold-out, and run sizes match it
    train_idx, val_idx = held_out_split(960, 0.1, 0)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    splits = load_dataset("mnist1d", root=data.data_root, val_frac=0.1, seed=0, num_samples=1200)
    train_x, val_x = splits.train.tensors[0], splits.val.tensors[0]  # type: ignore[attr-defined]
    train_rows = {tuple(r.tolist()) for r in train_x}
    assert not any(tuple(r.tolist()) in train_rows for r in val_x)
    assert (len(train_x), len(val_x)) == (fm["num_train"], fm["num_val"])

    # another run_id on the same store, or the same run_id with another config: refused
    with pytest.raises(ValueError, match="another run"):
        _run(data, _sampling(), tmp_path, "other")
    with pytest.raises(ValueError, match="another config"):
        _run(data, _sampling(lr=0.01), tmp_path, "epochs")


def test_checkpoint_clock_spaces_reports():
    """Due once ``interval_s`` has passed since the last report, or when forced; 0: always."""
    clock = CheckpointClock(3600, torch.device("cpu"))
    assert not clock.due() and clock.due(force=True)
    clock.last -= 3600
    assert clock.due()
    clock.reported()
    assert not clock.due()
    assert CheckpointClock(0, torch.device("cpu")).due()


def test_phase_timer_counts_nested_phases_once():
    """A phase inside another counts under its own name only; a resumed timer adds the
    seconds of the attempts before."""
    timer = PhaseTimer()
    with timer("outer"):
        time.sleep(0.05)
        with timer("inner"):
            time.sleep(0.1)
    assert timer.seconds["inner"] >= 0.1
    assert 0.05 <= timer.seconds["outer"] < 0.15  # counting the inner phase too would be >= 0.15
    timer.resume({"outer": 1.0, "earlier": 2.0})
    assert timer.seconds["outer"] >= 1.05 and timer.seconds["earlier"] == 2.0


def test_step_interval(step_run):
    res, store = step_run
    # every 5 steps, plus the final weights at step 12 regardless of the interval
    assert res.candidates == store.names() == ["step00000005", "step00000010", "step00000012"]
    assert [store.info(n).epoch for n in store.names()] == pytest.approx([5 / 6, 10 / 6, 2.0])


def test_worker_failure_resumes_without_duplicates(data, step_run, tmp_path, plan_faults):
    """Two failures in epoch 2 (the last checkpoint is the end of epoch 1, step 6):

    - after step 8 the last rank raises (an exception in the loop);
    - after step 10 rank 0 -- the writer -- SIGKILLs its own process right after writing the
      step-10 candidate (a real process death, no cleanup).

    Each time the group restarts from step 6 and replays the same batches; the step-10 candidate
    is written again under the same name. The store ends with exactly the reference run's
    candidates: same names, steps and weights, none duplicated, no temp file left.
    """
    ref, ref_store = step_run
    sampling = _sampling(sample_interval=5, interval_unit="step", max_failures=2)
    plan_faults(
        [
            {"phase": "sampling", "kind": "raise", "step": 8, "marker": tmp_path / "raised"},
            {"phase": "sampling", "kind": "kill", "step": 10, "marker": tmp_path / "killed"},
        ]
    )
    res = _run(data, sampling, tmp_path, "steps")
    assert (
        (tmp_path / "raised").read_text().startswith("raise sampling 8 (rank 1, pid ")
    )  # it raised
    killed = (tmp_path / "killed").read_text()
    assert killed.startswith("kill sampling 10 (rank 0, pid ")
    pid = int(killed.split("pid ")[1].rstrip(")\n"))
    assert not os.path.exists(f"/proc/{pid}")  # the worker process really died
    store = CandidateStore(str(tmp_path / "store"))
    assert res.candidates == store.names() == ref.candidates
    assert [store.info(n).step for n in store.names()] == [5, 10, 12]
    assert len(os.listdir(tmp_path / "store")) == 3  # no duplicate or leftover temp file
    assert [h["epoch"] for h in res.history] == [1, 2]
    for name in ref.candidates:  # same data order and state after the restarts: same weights
        torch.testing.assert_close(
            store.read(name, verify=True), ref_store.read(name), rtol=0, atol=1e-6
        )


# --------------------------------------------------------------------------- user train loop


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def user_train_loop(config):
    import ray.train
    import ray.train.torch

    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(TinyNet())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = Snapshotter(config["store"], model, every=3, unit="step")
    step = 0
    for epoch in range(2):
        for _ in range(4):
            x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            snap.maybe_snapshot(step=step, epoch=step / 4)
        ray.train.report({"epoch": epoch, "written": len(snap.written)})
    snap.maybe_snapshot(step=step, epoch=2, force=True)


def test_snapshotter_in_user_loop(tmp_path):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    # the workers cannot import this test module: ship its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        user_train_loop,
        train_loop_config={"store": str(tmp_path / "store")},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="user", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    store = CandidateStore(str(tmp_path / "store"))
    assert store.names() == ["step00000003", "step00000006", "step00000008"]
    assert {store.info(n).run_id for n in store.names()} == {"user"}  # default: the Train run name
    layout = store.layout
    assert layout is not None
    assert layout.names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    for name in store.names():
        assert torch.isfinite(store.read(name)).all()


def test_snapshotter_validates(tmp_path):
    with pytest.raises(ValueError, match="every=0"):
        Snapshotter(str(tmp_path), TinyNet(), every=0)
    with pytest.raises(ValueError, match="unit="):
        Snapshotter(str(tmp_path), TinyNet(), every=1, unit="batch")  # type: ignore[arg-type]
    snap = Snapshotter(str(tmp_path / "s"), TinyNet(), every=2, unit="epoch", run_id="a")
    due = [snap.due(step=0, epoch=e) for e in (0, 1, 2, 2.5, 4)]
    assert due == [False, False, True, False, True]
    assert snap.maybe_snapshot(step=7, epoch=2) == "step00000007"
    with pytest.raises(ValueError, match="belongs to run 'a'"):
        Snapshotter(str(tmp_path / "s"), TinyNet(), every=1, run_id="b").snapshot(step=7)

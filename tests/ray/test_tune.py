"""Sweeps on a real local Ray with the dashboard on: the sampling run is shared, the outputs are
written, a sweep resumes, and ASHA stops trials early without hanging."""

import contextlib
import json
import os
import signal

import pandas as pd
import pytest
import yaml

from twa_ray.cli import build_parser, config_from_args, main
from twa_ray.config import config_from_dict
from twa_ray.store import CandidateStore
from twa_ray.tune_plan import SweepPlan

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = {
    "data": {"model": "mlp", "num_samples": 1500},  # the sweep tests were written on the MLP
    "sampling": {"epochs": 8, "sample_frac": 0.5, "batch_size": 64},  # 4 sampled epochs
    "twa": {"epochs": 4},
    "mode": "v",
}


@pytest.fixture(scope="module")
def ray_dashboard():
    """A local Ray WITH the dashboard (the State API that Tune's trial cleanup may use); its own
    module, as the other Ray tests run without it."""
    import ray

    from twa_ray.connect import local_ray_defaults

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    local_ray_defaults()  # what a local Ray of `twa-ray sweep` gets
    ray.init(num_cpus=2, include_dashboard=True, object_store_memory=512 << 20)
    yield
    ray.shutdown()


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging (SIGALRM raises in the main thread, where Tune's loop runs)."""

    def fire(signum, frame):
        raise TimeoutError(f"the sweep did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _write(path, sweep):
    path.write_text(yaml.safe_dump({**TINY, "sweep": sweep}))
    return str(path)


@pytest.fixture(scope="module")
def grid_sweep(ray_dashboard, tmp_path_factory):
    """2 TWA learning rates x sample_interval 1 and 2: 4 trials, one sampling knob set."""
    root = tmp_path_factory.mktemp("grid")
    config = _write(
        root / "sweep.yaml",
        {
            "scheduler": "none",
            "max_concurrent": 1,
            "space": {
                "twa.lr": {"grid": [0.02, 0.1]},
                "sampling.sample_interval": {"grid": [1, 2]},
            },
        },
    )
    out = root / "out"
    with deadline(400):
        assert main(["sweep", "--config", config, "--out", str(out)]) == 0
    return root, config, out


def test_grid_sweep_samples_once_and_writes_outputs(grid_sweep):
    _, _, out = grid_sweep
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["trials"] == 4 and counts["completed"] == 4
    assert counts["sampling_runs"] == counts["sampling_runs_this_call"] == 1
    assert len([p for p in (out / "sampling").iterdir() if p.is_dir()]) == 1
    assert summary["sampling"]["epochs_run"] == 4 and summary["sampling"]["epochs_naive"] == 16

    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 4 and (table["status"] == "completed").all()
    csv = pd.read_csv(out / "trials.csv")
    assert list(csv.columns) == list(table.columns) and list(csv["val_acc"]) == list(
        table["val_acc"]
    )
    assert (table["val_acc"] > 0.25).all() and (table["twa_epochs"] == 4).all()  # chance: 0.1
    by_interval = table.groupby("sampling.sample_interval")["num_candidates"].unique()
    assert list(by_interval[1]) == [4] and list(by_interval[2]) == [2]  # every 2nd candidate

    # the interval-2 trials took the even epochs of the one store (plan.json: the typed plan)
    plan = SweepPlan.from_dict(json.loads((out / "plan.json").read_text()))
    (group,) = plan.groups.values()
    store = CandidateStore(group.store)
    for t in plan.trials:
        epochs = [round(store.info(n).epoch) for n in t.candidates]
        assert epochs == ([1, 2, 3, 4] if t.config.sampling.sample_interval == 1 else [2, 4])

    # best: the highest val_acc; test accuracy reported beside it, not used to pick
    best = summary["best"]
    assert best["val_acc"] == table["val_acc"].max()
    assert summary["best_test_acc"] == table.set_index("index").loc[best["index"], "test_acc"]
    assert (out / "sweep.png").stat().st_size > 1000

    # each trial scored the free averages of its candidates on the select split (issue 29)
    assert set(table["free_best"]) <= {"swa", "last"} and (table["free_best_acc"] > 0.1).all()
    free = summary["free_average"]
    assert free["val_acc"] == table["free_best_acc"].max()
    assert free["beats_every_trial"] == (free["val_acc"] > best["val_acc"])

    # best.yaml is a run config that `twa-ray run --config` accepts
    text = (out / "best.yaml").read_text()
    assert text.startswith("# twa-ray run --config")
    cfg = config_from_dict(yaml.safe_load(text))
    assert cfg.mode == "v" and cfg.twa.lr == best["params"]["twa.lr"]
    args = build_parser().parse_args(["run", "--config", str(out / "best.yaml"), "--smoke-test"])
    assert config_from_args(args, smoke_test=True).twa.lr == cfg.twa.lr


def test_sweep_refuses_then_resumes_without_sampling_again(grid_sweep, capsys):
    _, config, out = grid_sweep
    assert main(["sweep", "--config", config, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    before = json.loads((out / "summary.json").read_text())
    with deadline(300):
        assert main(["sweep", "--config", config, "--out", str(out), "--resume"]) == 0
    after = json.loads((out / "summary.json").read_text())
    assert after["counts"]["sampling_runs_this_call"] == 0 and after["counts"]["trials"] == 4
    assert (
        after["sweep_id"] == before["sweep_id"]
        and after["best"]["index"] == before["best"]["index"]
    )


def test_asha_stops_a_trial_early_and_finishes(grid_sweep):
    root, _, grid_out = grid_sweep
    # the first trial is good; the huge learning rates wreck the weights, so ASHA (keep the
    # better half at each rung) stops them at its first rung instead of running 4 epochs
    config = _write(
        root / "asha.yaml",
        {
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "max_concurrent": 1,
            "space": {"twa.lr": {"grid": [0.05, 30.0, 60.0, 100.0]}},
        },
    )
    out = root / "asha"
    shared = str(grid_out / "sampling")  # the grid sweep's run has the same sampling knobs
    with deadline(300):
        assert main(["sweep", "--config", config, "--out", str(out), "--sampling-dir", shared]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["sampling_runs_this_call"] == 0  # reused across sweeps
    table = pd.read_parquet(out / "trials.parquet")
    assert set(table["status"]) <= {"completed", "stopped"}
    stopped = table[table["status"] == "stopped"]
    assert len(stopped) >= 1 and (stopped["twa_epochs"] < 4).all()
    assert summary["counts"]["stopped_early"] == len(stopped)
    assert summary["best"]["index"] == 0


def test_tune_search_space_objects_draw_themselves():
    """From Python a space may hold Ray Tune's own objects; the plan draws them (no Ray needed)."""
    from ray import tune

    from twa_ray.tune_plan import draw_trials

    drawn = draw_trials(
        {"a": tune.grid_search([1, 2]), "b": tune.uniform(0.0, 1.0)}, num_samples=2, seed=0
    )
    assert [t["a"] for t in drawn] == [1, 2, 1, 2]
    assert len({t["b"] for t in drawn}) == 4 and all(
        0 <= t["b"] < 1 and isinstance(t["b"], float) for t in drawn
    )


def test_gpu_trials_are_refused_where_no_node_has_the_gpus(ray_dashboard, tmp_path, capsys):
    """--gpus-per-trial reaches the sweep config and the check of Tune's resources: on this
    local Ray without GPUs it is one line, exit 2, before any sampling."""
    config = _write(tmp_path / "sweep.yaml", {"space": {"twa.lr": {"grid": [0.1]}}})
    args = build_parser().parse_args(
        ["sweep", "--config", config, "--out", str(tmp_path / "o"), "--gpus-per-trial", "0.5"]
    )
    from twa_ray.cli import sweep_config_from_args

    assert sweep_config_from_args(args).gpus_per_trial == 0.5
    capsys.readouterr()
    assert (
        main(["sweep", "--config", config, "--out", str(tmp_path / "o"), "--gpus-per-trial", "1"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus-per-trial 1" in err[0] and "most on one node is 0" in err[0], (
        err
    )
    assert not (tmp_path / "o" / "sampling").exists()

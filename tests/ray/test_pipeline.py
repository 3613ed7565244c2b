"""End to end: the main job at tiny size on a real local Ray (2 CPUs, 2 workers), an uninterrupted
run and a run whose driver is SIGKILLed mid-sampling and then resumed with ``--resume``."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from twa_ray.cli import main
from twa_ray.ray.faults import FAULTS_ENV
from twa_ray.report import SAVABLE_BY
from twa_ray.store import CandidateStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]


# the smoke run with a budget of 8 epochs: 4 sampled epochs (16 steps each), 1 TWA epoch
SMOKE = ["run", "--smoke-test", "--epochs", "8"]


@pytest.fixture(scope="module")
def smoke(ray_cluster, tmp_path_factory):
    """``twa-ray run --smoke-test --epochs 8 --compare-full``, uninterrupted: (out dir, what it
    printed)."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*SMOKE, "--compare-full", "--out", str(out)]) == 0
    return out, printed.getvalue()


def _test_acc(out) -> float:
    """Test accuracy of ``out/model.safetensors`` on the run's test split (from config.yaml)."""
    import yaml
    from safetensors.torch import load_file

    from twa_ray.config import config_from_dict
    from twa_ray.core.evaluate import evaluate
    from twa_ray.data import load_dataset
    from twa_ray.models import build_model

    cfg = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    d = cfg.data
    splits = load_dataset(
        d.dataset, root=d.data_root, val_frac=d.val_frac, seed=d.seed, num_samples=d.num_samples
    )
    model = build_model(d.model, num_classes=splits.num_classes, input_shape=splits.input_shape)
    model.load_state_dict(load_file(out / "model.safetensors"))
    loader = torch.utils.data.DataLoader(splits.test, batch_size=512)
    return evaluate(model, loader).acc


def test_run_smoke_end_to_end(smoke, capsys):
    out, table = smoke
    metrics = json.loads((out / "metrics.json").read_text())
    methods = metrics["methods"]
    assert set(methods) >= {"sgd_sampled", "swa", "ema", "twa_t", "twa_v", "sgd_short", "sgd_full"}
    for name, m in methods.items():
        assert m["test_acc"] > 0.2, (name, m)  # 10 classes: chance is 0.1
    assert methods["twa_t"]["alpha_identical"] and methods["twa_v"]["alpha_identical"]
    # the written model is the saved_model (report.choose_saved: the best on the hold part of
    # val, which TWA-v did not fit on, among TWA-t, TWA-v, EMA, SWA and the last iterate; the
    # first in SAVABLE order on a tie): its test accuracy, recomputed here from the file; best is
    # the method of highest validation accuracy
    saved, savable = metrics["saved_model"], SAVABLE_BY["run"]
    assert metrics["best_split"] == "val"
    hold = {m: methods[m]["hold_acc"] for m in savable}
    assert saved == max(savable, key=lambda m: hold[m])
    assert "hold" in metrics["saved_reason"] and all(m in metrics["saved_reason"] for m in savable)
    assert methods[metrics["best"]]["val_acc"] == max(m["val_acc"] for m in methods.values())
    assert _test_acc(out) == pytest.approx(methods[saved]["test_acc"], abs=2.5 / 300)
    rows, blocks = metrics["subspace"]["num_rows"], metrics["subspace"]["num_blocks"]
    assert metrics["bytes_allreduced_per_step"] == rows * blocks * 4
    phase = metrics["coefficient_phase"]  # auto keeps this small B replicated; the kernel path ran
    assert phase["basis_placement"] == "replicate" and "fit in" in phase["basis_placement_reason"]
    assert (
        phase["kernel"]["path"] == "torch"
        or phase["kernel"]["path"] in phase["kernel"]["available"]
    )
    assert metrics["epochs_used"] == 5 and metrics["budget_saved"] == pytest.approx(0.375)
    for name in ("model.safetensors", "coefficients.parquet", "accuracy.png", "config.yaml"):
        assert (out / name).stat().st_size > 0
    assert "| twa_v" in table and "budget_saved_%" in table
    _check_baselines_and_wall_clock(metrics, table)

    # the same --out again: refused unless --resume / --overwrite
    assert main([*SMOKE, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def _check_baselines_and_wall_clock(metrics, table):
    """``--compare-full``: SGD over the budget and compressed to TWA's epochs, the EMA chosen on
    val, and every method's wall seconds built from the phases timed in this run."""
    methods, wall = metrics["methods"], metrics["wall_s"]
    assert (
        methods["sgd_full"]["epochs_used"] == 8 and methods["sgd_short"]["epochs_used"] == 5
    )  # 4 + 1 TWA epoch
    assert len(metrics["sampling_history"]) == 4
    ema = methods["ema"]  # its decay chosen on the part of val TWA-v fits on (the hold is kept)
    assert set(ema["val_acc_by_decay"]) == {"0.99", "0.998", "0.9995"}
    assert ema["decay_chosen_on"] == "fit"
    assert max(ema["fit_acc_by_decay"].values()) == ema["fit_acc_by_decay"][str(ema["decay"])]
    for split in ("val", "hold", "test"):
        assert ema[f"{split}_acc"] == ema[f"{split}_acc_by_decay"][str(ema["decay"])]
    assert wall["ray_start"] >= 0  # 0.0 when this process's Ray was already up
    for phase in ("setup", "data_preparation", "twa_group", "worker_startup"):
        assert wall[phase] > 0, phase
    for phase in ("basis", "ema", "sgd_short", "sgd_full", "output_writing"):
        assert wall[phase] > 0, phase
    for part in ("setup", "compute", "snapshot_io", "evaluation", "checkpoint_io"):
        assert wall["sampling"][part] > 0, part
    for part in ("setup", "swa", "compute", "evaluation", "checkpoint_io"):
        assert wall["coefficients"][part] > 0, part
    # one worker group: its parts add up to its seconds (start-up and the rest are Ray's)
    sampling, coeff = sum(wall["sampling"].values()), sum(wall["coefficients"].values())
    parts = wall["worker_startup"] + sampling + wall["basis"] + coeff + wall["group_other"]
    assert wall["twa_group"] == pytest.approx(parts, abs=0.1)
    assert 0 < wall["sampling_epochs"] < wall["twa_group"]  # start-up and checkpoints are the rest
    modes = wall["coefficient_modes"]
    path = wall["setup"] + wall["twa_group"]
    assert wall["twa_path"] == pytest.approx(path, abs=0.02)
    assert methods["twa_v"]["wall_s"] == pytest.approx(path - modes["twa_t"] - wall["swa"], abs=0.1)
    assert methods["swa"]["wall_s"] == pytest.approx(path - sum(modes.values()), abs=0.1)
    sampled = path - wall["basis"] - coeff
    assert methods["sgd_sampled"]["wall_s"] == pytest.approx(sampled, abs=0.1)
    assert methods["sgd_full"]["wall_s"] == pytest.approx(wall["setup"] + wall["sgd_full"], abs=0.1)
    full = methods["sgd_full"]["wall_s"]
    for name, m in methods.items():
        # wall_s is rounded to 0.1 s, time_saved is not: a/b moves by <= 0.05 (1 + a/b) / (b - 0.05)
        ratio = m["wall_s"] / full
        tol = 0.05 * (1 + ratio) / (full - 0.05) + 1e-9
        assert m["time_saved"] == pytest.approx(1 - ratio, abs=tol), name
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert "wall_s" in header and "time_saved_%" in header


def test_more_workers_than_cpus_refused_up_front(ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--smoke-test", "--workers", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twa-ray: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert "3 workers" in err and "2 CPUs" in err and "--workers" in err
    assert not (out / "run.json").exists()  # nothing claimed, nothing written


def _wait_for(cond, proc, log, what, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(
                f"the driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _wait_until_train_actors_died(timeout: float = 120.0) -> None:
    """Until Ray has stopped every Ray Train actor on this module's cluster: a driver's death
    reaches its controller and workers seconds later (a loaded machine: one more candidate
    written meanwhile)."""
    from ray._private.state import actors

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [
            a["ActorClassName"]
            for a in actors().values()
            if a["State"] != "DEAD" and a["ActorClassName"] in ("TrainController", "RayTrainWorker")
        ]
        if not alive:
            return
        time.sleep(0.1)
    pytest.fail(f"Ray Train actors still alive {timeout:g} s after their driver died: {alive}")


def test_driver_crash_then_resume_gives_the_uninterrupted_candidates(smoke, tmp_path, capsys):
    """The driver (a ``twa-ray run`` process attached to this module's cluster) is SIGKILLed
    once Ray Train has recorded a sampling checkpoint, with sampling epochs still to run.
    Re-running without a flag is refused; with ``--resume`` it continues from that checkpoint
    (the candidates it covers are not written again) and ends with exactly the candidates and
    coefficients of the uninterrupted run."""
    import ray

    ref_out, _ = smoke
    out = tmp_path / "run"
    log = tmp_path / "driver.log"
    argv = [*SMOKE, "--checkpoint-interval", "0", "--out", str(out)]  # a checkpoint per epoch
    address = ray.get_runtime_context().gcs_address
    # Ray Train collects reports (and registers checkpoints) at every health check: every 0.2 s
    # instead of 2 s, so the kill lands while sampling epochs (about 0.5 s each) are still to run
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "twa_ray.cli", *argv, "--address", address],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    try:
        _wait_for(lambda: (out / "run.json").exists(), proc, log, "run.json")
        run_id = json.loads((out / "run.json").read_text())["run_id"]
        snapshot = out / "work" / "ray_train" / f"twa_{run_id}" / "checkpoint_manager_snapshot.json"

        def checkpointed_epoch() -> int:
            try:
                return max(
                    map(int, re.findall(r"checkpoint_epoch(\d{4})", snapshot.read_text())),
                    default=0,
                )
            except OSError:
                return 0

        _wait_for(lambda: checkpointed_epoch() >= 1, proc, log, "the first sampling checkpoint")
        os.kill(proc.pid, signal.SIGSTOP)  # freeze the driver while looking
        epoch = checkpointed_epoch()
        written = {p.name: p.stat().st_ino for p in (out / "candidates").glob("*.arrow")}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _wait_until_train_actors_died()  # the dead driver's workers write no candidate after this
    assert not (out / "metrics.json").exists()
    assert epoch < 4 and len(written) < 4, (epoch, written)  # killed with sampling epochs to go

    # the same command again: refused, naming both ways out; nothing changes
    before = sorted(p.name for p in (out / "candidates").iterdir())
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert sorted(p.name for p in (out / "candidates").iterdir()) == before

    # --resume: continues the same run from its last checkpoint
    assert main([*argv, "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_id"] == run_id
    store, ref = (
        CandidateStore(str(out / "candidates")),
        CandidateStore(str(ref_out / "candidates")),
    )
    assert store.names() == ref.names() and len(store.names()) == 4
    # no duplicate; a worker torn down with the driver mid-write may leave a hidden temp file,
    # which never lists or loads as a candidate
    extra = sorted(set(os.listdir(out / "candidates")) - {f"{n}.arrow" for n in ref.names()})
    assert all(n.startswith(".") and n.endswith(".tmp") for n in extra), extra
    for name in ref.names():
        info = store.info(name)
        assert info.run_id == run_id and info.step == ref.info(name).step
        torch.testing.assert_close(store.read(name, verify=True), ref.read(name), rtol=0, atol=1e-6)
        if info.epoch <= epoch:  # covered by the checkpoint it resumed from: not written again
            assert (out / "candidates" / f"{name}.arrow").stat().st_ino == written[f"{name}.arrow"]
    assert [h["epoch"] for h in metrics["sampling_history"]] == [1, 2, 3, 4]
    # the moving averages went through the checkpoint too: the same EMA as without the crash
    ref_ema = json.loads((ref_out / "metrics.json").read_text())["methods"]["ema"]
    assert metrics["methods"]["ema"]["val_acc_by_decay"] == ref_ema["val_acc_by_decay"]
    alpha = pq.read_table(out / "coefficients.parquet").column("alpha").to_numpy()
    ref_alpha = pq.read_table(ref_out / "coefficients.parquet").column("alpha").to_numpy()
    torch.testing.assert_close(
        torch.from_numpy(alpha), torch.from_numpy(ref_alpha), rtol=1e-4, atol=1e-5
    )


def test_a_failure_in_the_coefficient_phase_resumes_there(smoke, tmp_path, plan_faults):
    """TWA-v only; the last rank raises after coefficient step 10 with ``--max-failures 1``:
    the one worker group restarts from its last coefficient checkpoint (a pass over val ends
    every few steps), rebuilds B from the store without sampling again, and ends with the
    uninterrupted run's candidates, EMA, history and TWA-v alpha."""
    ref_out, _ = smoke
    out = tmp_path / "run"
    plan_faults(
        [{"phase": "coefficients", "kind": "raise", "step": 10, "marker": tmp_path / "raised"}]
    )
    argv = [*SMOKE, "--mode", "v", "--checkpoint-interval", "0", "--max-failures", "1"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--out", str(out)]) == 0
    assert (tmp_path / "raised").read_text().startswith("raise coefficients 10 (rank 1, pid ")
    metrics = json.loads((out / "metrics.json").read_text())
    ref = json.loads((ref_out / "metrics.json").read_text())
    assert metrics["sampling_history"] == ref["sampling_history"]
    ema, ref_ema = metrics["methods"]["ema"], ref["methods"]["ema"]
    for key in ("decay", "val_acc_by_decay", "val_acc", "test_acc"):
        assert ema[key] == ref_ema[key], key
    assert metrics["methods"]["twa_v"]["test_acc"] == ref["methods"]["twa_v"]["test_acc"]
    assert metrics["methods"]["swa"]["test_acc"] == ref["methods"]["swa"]["test_acc"]
    alpha = pq.read_table(out / "coefficients.parquet").to_pandas()
    ref_alpha = pq.read_table(ref_out / "coefficients.parquet").to_pandas()
    ref_alpha = ref_alpha[ref_alpha.variant == "twa_v"].reset_index(drop=True)
    assert alpha.equals(ref_alpha)
    store, ref_store = (
        CandidateStore(str(out / "candidates")),
        CandidateStore(str(ref_out / "candidates")),
    )
    assert store.names() == ref_store.names()
    for name in ref_store.names():
        assert torch.equal(store.read(name), ref_store.read(name))
    # one group started twice; the restart resumed in the coefficient phase (coeff.pt counts it)
    run_id = metrics["run_id"]
    starts = Path(os.environ[FAULTS_ENV] + ".starts").read_text().splitlines()
    assert starts.count(f"twa_{run_id}") == 2, starts
    final = out / "work" / "ray_train" / f"twa_{run_id}" / "checkpoint_final"
    assert json.loads((final / "phase.json").read_text())["phase"] == "coefficients"
    assert torch.load(final / "coeff.pt", weights_only=True)["restarts"] == 1

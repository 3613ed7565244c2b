"""What twa_ray.ray.ray_internals relies on in Ray: each test fails loudly when a Ray upgrade
changes it (then the workaround must change, or go if Ray now offers a public way)."""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys

import pytest

from twa_ray.ray import ray_internals


def test_driver_log_printer_is_the_module_global_that_ray_init_installs(monkeypatch, capsys):
    import ray._private.worker as ray_worker

    assert "print_to_stdstream" in inspect.getsource(ray_worker.connect), (
        "ray.init no longer installs print_to_stdstream"
    )
    assert list(inspect.signature(ray_worker.print_to_stdstream).parameters) == [
        "data",
        "ignore_prefix",
    ]
    # Ray's own printer (an earlier CLI run in this process may have wrapped it), restored afterwards
    printer = ray_worker.print_to_stdstream
    monkeypatch.setattr(ray_worker, "print_to_stdstream", getattr(printer, "__wrapped__", printer))
    ray_internals.filter_driver_logs(lambda record, line: "noise" in line)
    ray_internals.filter_driver_logs(
        lambda record, line: False
    )  # idempotent: the first filter stays
    record = {
        "lines": ["some noise", "a real line"],
        "is_err": False,
        "pid": 7,
        "ip": "10.0.0.1",
        "actor_name": "A",
        "task_name": "",
        "job": "01000000",
    }
    ray_worker.print_to_stdstream(record, True)
    out = capsys.readouterr().out
    assert "a real line" in out and "noise" not in out


def test_train_report_logger_is_named_by_its_file():
    """Ray Train logs each report through ``context.logger`` at INFO; the names we quiet resolve
    to that very logger, and after ``quiet_train_logs`` it no longer passes INFO on."""
    import ray.train.v2._internal.execution.context as context

    from twa_ray.ray.logs import quiet_train_logs

    names = ray_internals.train_report_loggers()
    assert context.logger.name == context.__file__ and context.__file__ in names
    assert logging.getLogger(names[-1]) is context.logger
    assert "logger.info(" in inspect.getsource(context.TrainContext._wait_then_report), (
        "Ray Train no longer logs its reports through the module logger"
    )
    touched = [logging.getLogger(n) for n in [*names, "twa_ray"]]
    levels = [log.level for log in touched]
    try:
        context.logger.setLevel(logging.INFO)  # as in a Train worker: every report is logged
        assert context.logger.isEnabledFor(logging.INFO)
        quiet_train_logs()
        assert not context.logger.isEnabledFor(logging.INFO)
        assert context.logger.isEnabledFor(logging.WARNING)
    finally:
        for log, level in zip(touched, levels, strict=True):
            log.setLevel(level)


def test_train_fit_installs_its_sigint_handler_through_the_method_we_replace(monkeypatch):
    import ray.tune.tune as tune_run
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert "self._register_sigint_handler(" in inspect.getsource(DataParallelTrainer), (
        "Ray Train changed its SIGINT hook"
    )
    assert "TUNE_DISABLE_SIGINT_HANDLER" in inspect.getsource(tune_run)  # Tune's documented switch
    monkeypatch.setattr(
        DataParallelTrainer,
        "_register_sigint_handler",
        DataParallelTrainer._register_sigint_handler,
    )
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    ray_internals.stop_train_sigint_handler()
    assert DataParallelTrainer._register_sigint_handler(None, None) is None  # ours: does nothing


_SIGTERM_SCRIPT = """
import json, os, signal, time
import ray
from twa_ray.ray.ray_internals import keep_signal_handlers

def ours(signum, frame):
    raise KeyboardInterrupt(signum)

signal.signal(signal.SIGTERM, ours)
with keep_signal_handlers():
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 << 20)
    replaced = signal.getsignal(signal.SIGTERM) is not ours
kept = signal.getsignal(signal.SIGTERM) is ours
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    handled = False
except KeyboardInterrupt:
    handled = True
ray.shutdown()
print(json.dumps({"replaced": replaced, "kept": kept, "handled": handled}))
"""


@pytest.mark.ray
def test_ray_init_replaces_the_sigterm_handler_and_ours_is_kept(tmp_path):
    """``ray.init`` still replaces the SIGTERM handler (else the workaround is moot), and with
    keep_signal_handlers a SIGTERM after it reaches ours (not Ray's abort with a stack dump)."""
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_SCRIPT], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"replaced": True, "kept": True, "handled": True}, (
        result,
        proc.stderr[-2000:],
    )


def test_worker_group_error_wraps_each_ranks_exception_in_base_exc():
    """A failed rank's exception reaches the driver inside Ray's wrapper, the original in
    ``_base_exc``; the worker logs its traceback from the logger we silence."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    from twa_ray.errors import TwaError

    try:
        raise TwaError("one line", "usage", False, "details")
    except TwaError as e:
        wrapped = construct_user_exception_with_traceback(e)
    lost = RuntimeError("actor died")
    error = WorkerGroupError("snippet", {0: wrapped, 1: lost})
    got = ray_internals.worker_exceptions(error)
    assert isinstance(got[0], TwaError) and got[0].line == "one line" and got[1] is lost
    source = inspect.getsource(construct_user_exception_with_traceback)
    assert "logger.error" in source, "Ray Train logs a worker's traceback elsewhere now"
    import ray.train.v2._internal.util as util

    assert ray_internals.worker_error_logger() == util.logger.name == "ray.train.v2._internal.util"
    assert ray_internals.worker_exceptions(RuntimeError("not a group error")) == {}


def test_tune_logs_a_failed_trial_through_the_loggers_we_quiet():
    """Ray Tune logs a failed trial's traceback (its controller) and the incomplete trials
    (``tune.run``) through the loggers :func:`quiet_trial_errors` raises; ``Result.error``'s
    ``cause`` is the trainable's exception."""
    import importlib

    from ray.exceptions import RayTaskError

    from twa_ray.errors import TwaError

    controller = importlib.import_module("ray.tune.execution.tune_controller")
    tune_run = importlib.import_module("ray.tune.tune")
    assert 'logger.error(f"Trial task failed for trial' in inspect.getsource(controller)
    assert 'logger.error("Trials did not complete' in inspect.getsource(tune_run)
    assert ray_internals.trial_error_loggers() == (
        controller.logger.name,
        tune_run.logger.name,
    )
    cause = TwaError("one line", "usage", False, "details")
    wrapped = RayTaskError("train", "tb", cause).as_instanceof_cause()
    got = ray_internals.trial_exception(wrapped)
    assert isinstance(got, TwaError) and got.line == "one line" and got.kind == "usage"
    plain = RuntimeError("no cause")
    assert ray_internals.trial_exception(plain) is plain


_TRAINER_SCRIPT = """
import json, os, subprocess, sys
import ray, ray.train
from ray.train.torch import TorchTrainer
from twa_ray.ray.ray_internals import torch_trainer

def kinds(cls, **kw):
    trainer = cls(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), **kw)
    return sorted(type(c).__name__ for c in trainer._create_default_callbacks())

if sys.argv[1:] == ["connect"]:  # a Ray this process did not start
    ray.init()
    print(json.dumps(kinds(torch_trainer(datasets=False))))
    sys.exit()
ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 << 20)
from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
policy = create_scaling_policy(ray.train.ScalingConfig(num_workers=1))
connected = subprocess.run(
    [sys.executable, __file__, "connect"],
    env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
    capture_output=True, text=True, check=True,
).stdout.strip().splitlines()[-1]
print(json.dumps({
    "standard": kinds(TorchTrainer),
    "lean": kinds(torch_trainer(datasets=False)),
    "streamed": kinds(torch_trainer(datasets=True), datasets={"train": ray.data.range(4)}),
    "connected": json.loads(connected),
    "policy": type(policy).__name__,
    "hook": hasattr(TorchTrainer, "_initialize_and_run_controller"),
}))
ray.shutdown()
"""


@pytest.mark.ray
def test_torch_trainer_drops_the_callbacks_that_start_unused_helper_actors(tmp_path):
    """Ray Train starts its ``DatasetManager`` and ``PlacementGroupCleaner`` through the
    callbacks that :func:`torch_trainer` drops: the first with no datasets, the second on a Ray
    this process started; with datasets, or on a Ray it connected to, each is kept. (That the
    fits then start neither actor, nor the ``AutoscalingCoordinator``:
    ``tests/ray/test_sampling.py``.)"""
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    helpers = {"DatasetsCallback", "PlacementGroupCleanerCallback"}
    assert helpers <= set(got["standard"]), "Ray Train starts its helper actors elsewhere now"
    assert set(got["standard"]) - set(got["lean"]) == helpers
    assert set(got["standard"]) - set(got["streamed"]) == {"PlacementGroupCleanerCallback"}
    assert set(got["standard"]) - set(got["connected"]) == {"DatasetsCallback"}
    # the policy whose resource requests start the AutoscalingCoordinator, and the method that
    # hands it to the controller: where torch_trainer swaps it on a Ray this process started
    assert got["policy"] == "FixedScalingPolicy" and got["hook"]


def test_torch_backend_runs_the_worker_functions_of_rays_torch_config():
    """:func:`ray_internals._torch_backend` runs, on the workers, the functions that Ray's own
    torch backend runs for gloo and nccl, with the arguments it passes; a Ray upgrade that
    adds a step, renames one or changes its arguments fails here."""
    import ray.train.torch.config as config

    source = inspect.getsource(config._TorchBackend.on_start)
    for step in ("get_address_and_port", "_set_torch_distributed_env_vars", "MASTER_PORT"):
        assert step in source, f"Ray's torch backend no longer runs {step}"
    assert "_setup_torch_process_group," in source and "init_method=url" in source
    params = inspect.signature(config._setup_torch_process_group).parameters
    assert list(params) == ["backend", "world_rank", "world_size", "init_method", "timeout_s"]
    assert list(inspect.signature(config._shutdown_torch).parameters) == ["destroy_process_group"]
    assert "_shutdown_torch," in inspect.getsource(config._TorchBackend.on_shutdown)
    assert config.TorchConfig().to_dict().keys() == {"backend", "init_method", "timeout_s"}


_NO_TORCH_SCRIPT = """
import sys
import ray.cloudpickle as pickle
kwargs = pickle.loads(sys.stdin.buffer.read())
assert kwargs["backend_config"].to_dict()["backend"] == "gloo", kwargs
print("torch" in sys.modules)
"""


@pytest.mark.ray
def test_what_the_controller_unpickles_imports_no_torch():
    """The backend config and the callbacks built on it, which Ray Train's controller
    unpickles, load in a process without importing torch (a whole fit:
    ``tests/ray/test_sampling.py::test_epoch_interval_candidates``)."""
    import ray.cloudpickle as pickle
    import ray.train

    trainer = ray_internals.torch_trainer(datasets=False)(
        lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=2)
    )
    payload = pickle.dumps(
        {
            "backend_config": trainer.backend_config,
            "callbacks": trainer._create_default_callbacks(),
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SCRIPT],
        input=payload,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:].decode()
    assert proc.stdout.decode().split() == ["False"]

"""twa-ray average / import on a real candidate store (no Ray), and clean CLI errors."""

import json
import pickle
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from twa_ray.cli import main
from twa_ray.core.layout import Layout, flatten
from twa_ray.data import load_dataset
from twa_ray.models import build_model
from twa_ray.store import CandidateStore

NUM_SAMPLES = 800


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MNIST-1D MLP trained for 4 epochs: 4 epoch snapshots in a store and as .pt files."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    splits = load_dataset("mnist1d", num_samples=NUM_SAMPLES, seed=0)
    model = build_model("mlp", num_classes=splits.num_classes, input_shape=splits.input_shape)
    layout = Layout.from_module(model)
    store = CandidateStore(str(root / "store"), create=True)
    (root / "pt").mkdir()
    x, y = splits.train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(4):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
        store.write(flatten(model, layout), layout, step=epoch + 1, epoch=epoch + 1, source="test")
        torch.save(model.state_dict(), root / "pt" / f"epoch{epoch}.pt")
    return root


def test_average_writes_metrics_model_and_coefficients(trained, tmp_path):
    out = tmp_path / "avg"
    argv = [
        "average",
        "--store",
        str(trained / "store"),
        "--dataset",
        "mnist1d",
        "--num-samples",
        str(NUM_SAMPLES),
        "--model",
        "mlp",
        "--mode",
        "v",
        "--bits",
        "4",
        "--blocks",
        "tensor",
        "--twa-epochs",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("swa", "greedy_soup", "twa_v"):
        assert metrics["methods"][name]["test_acc"] > 0.2, (
            name,
            metrics["methods"][name],
        )  # chance: 0.1
    assert metrics["num_candidates"] == 4
    state = load_file(out / "model.safetensors")
    assert "layers.0.weight" in state or len(state) > 4  # parameters and BN buffers
    table = pq.read_table(out / "coefficients.parquet").to_pandas()
    assert set(table.variant) == {"twa_v"} and len(table) == 4 * metrics["subspace"]["blocks"]
    assert (out / "coefficients_twa_v.png").stat().st_size > 0


def test_average_device_flag(trained, tmp_path, capsys):
    """--device reaches the averaging: cpu runs (config.yaml records it); cuda on a machine
    without CUDA is one line, exit 2, nothing written."""
    base = [
        "average",
        "--store",
        str(trained / "store"),
        "--dataset",
        "mnist1d",
        "--num-samples",
        str(NUM_SAMPLES),
        "--model",
        "mlp",
        "--mode",
        "v",
        "--twa-epochs",
        "1",
        "--no-greedy-soup",
    ]
    assert main([*base, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    assert "device: cpu" in (tmp_path / "cpu" / "config.yaml").read_text()
    kernel = json.loads((tmp_path / "cpu" / "metrics.json").read_text())["kernel"]
    assert kernel["path"] == "torch" or kernel["path"] in kernel["available"], kernel
    if torch.cuda.is_available():
        return
    capsys.readouterr()
    assert main([*base, "--device", "cuda", "--out", str(tmp_path / "cuda")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "--device cpu" in err[0], err
    assert not (tmp_path / "cuda").exists()


def test_import_then_average_from_a_checkpoint_folder(trained, tmp_path):
    store = tmp_path / "imported"
    assert main(["import", str(trained / "pt"), "--out", str(store), "--model", "mlp"]) == 0
    assert len(CandidateStore(str(store))) == 4
    out = tmp_path / "avg"
    argv = [
        "average",
        "--store",
        str(trained / "pt"),
        "--model",
        "mlp",
        "--num-samples",
        str(NUM_SAMPLES),
        "--mode",
        "t",
        "--no-greedy-soup",
        "--twa-epochs",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "greedy_soup" not in json.loads((out / "metrics.json").read_text())["methods"]


class _Evil:
    """Unpickling this runs ``open(path, 'w')``: the payload of a malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _store_copy(trained, tmp_path, keep=4):
    """A copy of the trained store holding its first ``keep`` candidates."""
    dst = tmp_path / "store"
    dst.mkdir()
    for f in sorted((trained / "store").glob("*.arrow"))[:keep]:
        shutil.copy(f, dst / f.name)
    return dst


def _ckpt_folder(trained, tmp_path, edit=None, suffix=".pt"):
    """A folder of the four epoch checkpoints; ``edit`` changes the last one's state dict."""
    dst = tmp_path / "ckpts"
    dst.mkdir()
    for i in range(4):
        sd = torch.load(trained / "pt" / f"epoch{i}.pt", weights_only=True)
        if i == 3 and edit is not None:
            edit(sd)
        if suffix == ".pt":
            torch.save(sd, dst / f"epoch{i}.pt")
        else:
            save_file(sd, dst / f"epoch{i}.safetensors")
    return dst


def _truncated(trained, tmp_path):
    store = _store_copy(trained, tmp_path)
    last = sorted(store.glob("*.arrow"))[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return ["--store", str(store)]


def _evil(trained, tmp_path):
    folder = _ckpt_folder(trained, tmp_path)
    (folder / "evil.pt").write_bytes(pickle.dumps(_Evil(str(tmp_path / "pwned")), protocol=2))
    return ["--store", str(folder)]


def _nan(sd):
    next(iter(sd.values()))[0] = float("nan")


def _drop_tensor(sd):
    sd.pop(sorted(k for k in sd if k.endswith("weight"))[-1])


def _to_double(sd):
    key = next(k for k in sd if k.endswith("weight"))
    sd[key] = sd[key].double()


def _empty_store_uri(trained, tmp_path):
    (tmp_path / "s").mkdir()
    return ["--store", (tmp_path / "s").as_uri()]  # a store URI: no import attempted


def _empty_dir(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--store", str(tmp_path / "empty")]


# Each case: extra argv (or a function of (trained, tmp_path) returning it), a phrase of the one-line
# message. The ids are the README's bad-input table keys.
BAD_AVERAGE = [
    pytest.param(["--bits", "3"], "bits=3", id="bits-3"),
    pytest.param(["--bits", "64"], "bits=64", id="bits-64"),
    pytest.param(["--blocks", "layer"], "blocks='layer'", id="blocks"),
    pytest.param(["--twa-lr", "-1"], "lr=-1.0", id="twa-lr-negative"),
    pytest.param(["--twa-lr", "0"], "lr=0.0", id="twa-lr-zero"),
    pytest.param(["--twa-epochs", "0"], "epochs=0", id="twa-epochs-zero"),
    pytest.param(["--store", "/nonexistent/store"], "does not exist", id="missing-store"),
    pytest.param(["--model", "cnn1d"], "layout", id="other-model"),
    pytest.param(_empty_dir, "no checkpoints", id="empty-folder"),
    pytest.param(_empty_store_uri, "is empty", id="k0"),
    pytest.param(
        lambda t, p: ["--store", str(_store_copy(t, p, keep=1))], "at least 2 candidates", id="k1"
    ),
    pytest.param(_truncated, "corrupt or truncated", id="truncated-arrow"),
    pytest.param(_evil, "weights_only", id="pickle-code"),
    pytest.param(lambda t, p: ["--store", str(_ckpt_folder(t, p, _nan))], "NaN/Inf", id="nan"),
    pytest.param(
        lambda t, p: ["--store", str(_ckpt_folder(t, p, _drop_tensor, ".safetensors"))],
        "is missing",
        id="safetensors-missing-tensor",
    ),
    pytest.param(
        lambda t, p: ["--store", str(_ckpt_folder(t, p, _to_double))],
        "dtype float64, expected float32",
        id="dtype",
    ),
    pytest.param(
        ["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"],
        "data_batch_1.bin",
        id="dataset-root-missing",
    ),
]


@pytest.mark.parametrize("argv,needle", BAD_AVERAGE)
def test_bad_input_exits_2_with_one_clear_line(trained, tmp_path, capsys, argv, needle):
    if callable(argv):
        argv = argv(trained, tmp_path)
    base = {
        "--store": str(trained / "store"),
        "--model": "mlp",  # the trained checkpoints are MLPs (the default model is cnn1d)
        "--num-samples": str(NUM_SAMPLES),
        "--out": str(tmp_path / "o"),
    }
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    store = Path(base["--store"].removeprefix("file://"))

    def contents():
        return {p.name: p.read_bytes() for p in sorted(store.iterdir())} if store.is_dir() else None

    before = contents()
    trained_before = sorted(p.name for p in (trained / "store").iterdir())
    assert main(["average", *[t for kv in base.items() for t in kv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twa-ray: error:") and needle in err and "Traceback" not in err
    assert err.count("\n") == 1  # one line
    # nothing changed: the store (or checkpoint folder) read, the trained store, no candidates out
    assert contents() == before
    assert sorted(p.name for p in (trained / "store").iterdir()) == trained_before
    assert not list((tmp_path / "o").glob("candidates/*.arrow"))
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert not (tmp_path / "pwned").exists()  # no pickled code ran


BAD_RUN = [
    pytest.param(["--lr", "0"], "lr=0.0", id="lr-zero"),
    pytest.param(["--lr", "-0.1"], "lr=-0.1", id="lr-negative"),
    pytest.param(["--epochs", "0"], "epochs=0", id="epochs-zero"),
    pytest.param(["--epochs", "-3"], "epochs=-3", id="epochs-negative"),
    pytest.param(["--sample-interval", "0"], "sample_interval=0", id="interval-zero"),
    pytest.param(["--sample-frac", "0"], "sample_frac=0.0", id="sample-frac-zero"),
    pytest.param(["--sample-frac", "1.5"], "sample_frac=1.5", id="sample-frac-above-1"),
    pytest.param(["--workers", "0"], "num_workers=0", id="workers-zero"),
    pytest.param(["--bits", "5"], "bits=5", id="run-bits"),
    pytest.param(["--twa-lr", "0"], "lr=0.0", id="run-twa-lr-zero"),
    pytest.param(
        ["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"],
        "data_batch_1.bin",
        id="run-dataset-root-missing",
    ),
    pytest.param(["--model", "no_such_model"], "no_such_model", id="run-unknown-model"),
]


@pytest.mark.ray
def test_a_model_that_refuses_the_generated_data_stops_the_ray_it_overlapped(tmp_path, capsys):
    """MNIST-1D with a built-in model is prepared while Ray starts (issue 28): a model that
    refuses its shape is still one line, exit 2, nothing written, and no Ray left running."""
    import ray

    out = tmp_path / "o"
    assert main(["run", "--smoke-test", "--out", str(out), "--model", "resnet20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twa-ray: error:") and "resnet20 takes images" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not ray.is_initialized()
    assert not (out / "run.json").exists()


@pytest.mark.parametrize("argv,needle", BAD_RUN)
def test_bad_run_flags_exit_2_before_ray_starts(tmp_path, capsys, argv, needle):
    import ray

    out = tmp_path / "o"
    assert main(["run", "--smoke-test", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twa-ray: error:") and needle in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not ray.is_initialized()  # refused before any Ray work
    assert not (out / "run.json").exists()


def test_unwritable_out_is_refused(trained, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["average", "--store", str(trained / "store"), "--out", str(blocker / "sub")]
    assert main(argv) == 2
    assert "not a writable directory" in capsys.readouterr().err


def test_bring_your_own_model_and_data(trained, tmp_path, monkeypatch):
    """--model / --dataset as import paths to callables defined only here."""
    (tmp_path / "my_pkg.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from torch.utils.data import TensorDataset\n"
        "from twa_ray.data import load_dataset\n\n"
        "def build(num_classes, input_shape):\n"
        "    return nn.Sequential(nn.Linear(input_shape[0], 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes))\n\n"
        f"def data(seed=0):\n"
        f"    s = load_dataset('mnist1d', num_samples={NUM_SAMPLES}, seed=seed)\n"
        "    return s.train, s.val, s.test\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_pkg  # noqa: F401  (the module the CLI will import by name)

    splits = load_dataset("mnist1d", num_samples=NUM_SAMPLES, seed=0)
    model = my_pkg.build(splits.num_classes, splits.input_shape)
    layout = Layout.from_module(model)
    store = CandidateStore(str(tmp_path / "byo"), create=True)
    for step in range(3):
        torch.manual_seed(step)
        store.write(
            flatten(my_pkg.build(splits.num_classes, splits.input_shape), layout), layout, step=step
        )
    out = tmp_path / "out"
    argv = [
        "average",
        "--store",
        str(tmp_path / "byo"),
        "--dataset",
        "my_pkg:data",
        "--model",
        "my_pkg:build",
        "--mode",
        "t",
        "--twa-epochs",
        "1",
        "--no-greedy-soup",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "twa_t" in json.loads((out / "metrics.json").read_text())["methods"]


def test_out_with_another_run_or_nothing_to_resume_refused_before_ray(tmp_path, capsys):
    import ray

    out = tmp_path / "o"
    assert main(["run", "--smoke-test", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no run to resume" in err and "drop --resume" in err and err.count("\n") == 1
    assert not out.exists()  # a refused command leaves nothing behind
    out.mkdir()
    (out / "run.json").write_text('{"run_id": "run-earlier"}')
    assert main(["run", "--smoke-test", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "run.json").read_text() == '{"run_id": "run-earlier"}'
    assert not ray.is_initialized()


# --------------------------------------------------------------------------- conventions


def test_version_and_help_show_every_flag_with_its_default(capsys):
    from twa_ray import __version__
    from twa_ray.cli import build_parser

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"twa-ray {__version__}"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"twa-ray {name} {action.option_strings}: no help text"
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in (
        "(default: 20)",
        "(default: 0.1)",
        "(default: runs/twa)",
        "(default: size:16384)",
        "(default: auto)",
    ):
        assert default in text, default
    assert main(["average", "--help"]) == 0
    assert "(default: runs/average)" in " ".join(capsys.readouterr().out.split())


def test_flags_are_generated_from_the_config_fields():
    """Each flag's help is its field's docstring, its choices the field's Literal, its default
    the dataclass's; every config field has a docstring to give."""
    import dataclasses
    import typing

    from twa_ray.cli import KEYS, build_parser, field_docs, option
    from twa_ray.config import SECTIONS, RunConfig, SweepConfig

    for cls in (RunConfig, SweepConfig, *SECTIONS.values()):
        missing = (
            {f.name for f in dataclasses.fields(cls)}
            - set(field_docs(cls))
            - {"data", "sampling", "twa", "base"}
        )
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"
    run = next(a for a in build_parser()._actions if a.dest == "command").choices["run"]
    actions = {a.dest: a for a in run._actions}
    for key in KEYS["run"]:
        o = option(key)
        action = actions[o.name]
        assert action.help.startswith(o.doc[:40]) and o.flag in action.option_strings, key
        if typing.get_origin(o.kind) is typing.Literal:
            assert tuple(action.choices) == typing.get_args(o.kind), key
    assert (
        option("twa.lr").flag == "--twa-lr" and option("twa.bits").flag == "--bits"
    )  # twa- only where names clash
    assert (
        option("greedy_soup").flag == "--no-greedy-soup"
        and option("sampling.num_workers").flag == "--workers"
    )
    assert "(default: 0.2)" in actions["twa_lr"].help and "(default: 20)" in actions["epochs"].help


def test_verbosity_after_the_subcommand_and_no_third_party_debug_lines(trained, tmp_path, capsys):
    argv = [
        "--store",
        str(trained / "store"),
        "--model",
        "mlp",
        "--num-samples",
        str(NUM_SAMPLES),
        "--mode",
        "t",
        "--twa-epochs",
        "1",
        "--no-greedy-soup",
    ]
    assert main(["average", "-v", *argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "findfont" not in out.out + out.err and "matplotlib" not in out.out + out.err
    assert out.err == ""  # stderr holds problems only
    assert (
        "subspace: affine subspace of 4 candidates" in out.out
        and f"outputs in {tmp_path / 'a'}" in out.out
    )
    assert main(["average", "-q", *argv, "--out", str(tmp_path / "b")]) == 0
    assert "subspace:" not in capsys.readouterr().out


def test_out_is_locked_while_a_command_writes(tmp_path):
    from twa_ray import outdir

    held = outdir._lock(tmp_path / "o")
    try:
        code = (
            "import sys; from twa_ray import outdir\n"
            "try:\n    outdir._lock(sys.argv[1])\nexcept FileExistsError as e:\n    print(e); sys.exit(3)\n"
        )
        import subprocess
        import sys

        proc = subprocess.run(
            [sys.executable, "-c", code, str(held)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 3 and "another twa-ray command is writing" in proc.stdout
    finally:
        outdir.release_all()
    assert held.is_dir()  # created by the lock, released, not failed: kept


def _interrupt(argv: list[str], needle: str, signum: int) -> str:
    """Start ``twa-ray ARGV`` in a session of its own, send ``signum`` to it (as a scheduler,
    ``timeout``, ``docker stop`` or Kubernetes would: to the command alone) once a line holds
    ``needle``, and check that it exits with 128 + signum within seconds, the one line last and
    its whole session gone (Ray's processes included). Returns its output after the signal."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(
        ["twa-ray", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if needle in line:
                break
        assert needle in "".join(seen), "".join(seen)[-3000:]
        proc.send_signal(signum)
        rest = proc.communicate(timeout=90)[0]
        assert proc.returncode == 128 + signum, rest[-3000:]
        again = "--resume" if argv[0] == "run" else "--overwrite"
        assert rest.strip().splitlines()[-1] == f"twa-ray: interrupted; rerun with {again}", rest[
            -3000:
        ]
        assert "Traceback" not in rest and "SIGTERM received" not in rest, rest[-3000:]
        for _ in range(60):  # Ray's processes (same session) go with the driver
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("processes of the command survived the signal")
        return rest
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_no_forwarded_worker_line_follows_the_last_line(capsys, tmp_path):
    """Ray's printer forwards a worker's lines while Ray shuts down, after the command printed
    its last line (seen: a TWA-v step after "interrupted; rerun with --resume"): from that line
    on, every forwarded line is dropped; a new command forwards them again."""
    from twa_ray import cli

    worker = {"actor_name": "RayTrainWorker", "is_err": False}
    line = "twa-v epoch 0.12 step 2/16: loss 1.2997"
    cli._SAID_LAST.clear()
    assert not cli._ray_noise(worker, line)
    cli._Interrupt.told = False
    cli._Interrupt.tell("run")
    assert capsys.readouterr().err == "twa-ray: interrupted; rerun with --resume\n"
    assert cli._ray_noise(worker, line)
    args = cli.build_parser().parse_args(["run", "--smoke-test", "--out", str(tmp_path / "o")])
    streams, timeout_env = cli._prepare(args)  # the next command in this process
    cli._restore(ray_was_up=True, streams=streams, timeout_env=timeout_env)
    assert not cli._ray_noise(worker, line)


_SIGNALS = [pytest.param(2, id="SIGINT"), pytest.param(15, id="SIGTERM")]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("signum", _SIGNALS)
def test_signal_during_sampling_and_coefficients_exits_and_resumes(tmp_path, signum):
    """Ctrl-C (SIGINT) or SIGTERM to ``twa-ray run`` in the sampling phase, then to the
    ``--resume`` in the coefficient phase: each exits 130 / 143 within seconds with one line,
    Ray's processes gone, every stored candidate whole, and the run resumable."""
    out = tmp_path / "run"
    _interrupt(["run", "--smoke-test", "--out", str(out)], "sampling epoch 1/", signum)
    assert json.loads((out / "run.json").read_text())["run_id"]
    _interrupt(["run", "--smoke-test", "--out", str(out), "--resume"], "TWA-t/v on", signum)
    store = CandidateStore(str(out / "candidates"))
    assert len(store) >= 1 and all(
        store.read(n).numel() > 0 for n in store.names()
    )  # whole, CRC-checked
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", _SIGNALS)
def test_signal_during_average_exits_and_reruns(trained, tmp_path, signum):
    """SIGINT or SIGTERM in the coefficient phase of ``twa-ray average``: 130 / 143, one line,
    nothing half-written; the same command with --overwrite then finishes."""
    argv = [
        "average",
        "--store",
        str(trained / "store"),
        "--model",
        "mlp",
        "--num-samples",
        str(NUM_SAMPLES),
        "--mode",
        "t",
        "--no-greedy-soup",
        "--out",
        str(tmp_path / "o"),
    ]
    _interrupt([*argv, "--twa-epochs", "100000"], "subspace:", signum)
    assert not (tmp_path / "o" / "metrics.json").exists()
    assert main([*argv, "--twa-epochs", "1", "--overwrite"]) == 0


@pytest.mark.ray
@pytest.mark.slow
def test_worker_group_that_cannot_be_placed_is_one_line(tmp_path, capsys, monkeypatch):
    """3 workers on a 2-CPU Ray reached by address (it might grow, so only a warning up front):
    Ray Train gives up after the start timeout and --max-failures retries, not never; one line
    says what was asked and what the cluster has."""
    import ray

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
    try:
        argv = [
            "run",
            "--smoke-test",
            "--workers",
            "3",
            "--max-failures",
            "0",
            "--address",
            "auto",
            "--out",
            str(tmp_path / "o"),
        ]
        assert main(argv) == 2
    finally:
        ray.shutdown()
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("twa-ray:")]
    assert len(ours) == 1, ours  # (Ray's own worker logs come asynchronously around it)
    last = ours[0]
    assert last.startswith("twa-ray: error: Ray Train could not place 3 workers within 5 s"), last
    assert "the cluster has 2 CPUs" in last and "--workers" in last

"""A corpus of bad inputs, tried as a new user would: each one is refused with exit code 2 and
exactly one line ``twa-ray: error: <problem>; <fix>`` on stderr, no traceback, its inputs
unchanged (hashed before and after) and no --out left behind. Plus what must work: numeric
strings in YAML, Lightning and .safetensors checkpoints, imports keyed by content, owned --out.

The CLI runs in-process (``twa_ray.cli.main``); a few cases run it as a subprocess.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, run_cli
from safetensors.torch import save_file

from twa_ray.cli import main
from twa_ray.core.layout import Layout, flatten
from twa_ray.data import load_dataset
from twa_ray.models import build_model
from twa_ray.store import CandidateStore

N = 800  # MNIST-1D samples: seconds per average
FAST = [
    "--model",
    "mlp",
    "--num-samples",
    str(N),
    "--twa-epochs",
    "1",
    "--mode",
    "t",
    "--no-greedy-soup",
]
SWEEP_SPACE = {"twa.lr": {"grid": [0.1, 0.2]}}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Four MLP candidates of different seeds: a store, .pt, .safetensors, Lightning .ckpt files."""
    root = tmp_path_factory.mktemp("inputs")
    splits = load_dataset("mnist1d", num_samples=N, seed=0)
    store = CandidateStore(root / "store", create=True)
    for d in ("pt", "st", "lightning"):
        (root / d).mkdir()
    for i in range(4):
        torch.manual_seed(i)
        model = build_model("mlp", num_classes=splits.num_classes, input_shape=splits.input_shape)
        layout = Layout.from_module(model)
        store.write(flatten(model, layout), layout, step=i)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(sd, root / "pt" / f"c{i}.pt")
        save_file(sd, root / "st" / f"c{i}.safetensors")
        torch.save(
            {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": i},
            root / "lightning" / f"c{i}.ckpt",
        )
    return root


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _yaml(tmp: Path, text: str) -> str:
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return str(path)


def _copy_store(fx: Path, tmp: Path) -> Path:
    dst = tmp / "store"
    dst.mkdir()
    for f in (fx / "store").glob("*.arrow"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _flip_float(fx, tmp):
    store = _copy_store(fx, tmp)
    f = sorted(store.glob("*.arrow"))[1]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40  # in the float data (the footer is small)
    f.write_bytes(bytes(data))
    return ["average", "--store", str(store), "--out", str(tmp / "o"), *FAST]


def _bad_name(fx, tmp):
    store = _copy_store(fx, tmp)
    (store / "my candidate.arrow").write_bytes((fx / "store" / "step-000000000.arrow").read_bytes())
    return ["average", "--store", str(store), "--out", str(tmp / "o"), *FAST]


def _ckpts(tmp: Path, edit) -> Path:
    d = tmp / "ckpts"
    d.mkdir()
    for i in range(3):
        torch.manual_seed(i)
        sd = build_model("mlp", num_classes=10, input_shape=(40,)).state_dict()
        torch.save(edit(sd), d / f"c{i}.pt")
    return d


def _overflow(fx, tmp):
    def huge(sd):
        return {
            k: torch.sign(torch.randn_like(v)) * 3e38 if k.endswith(("weight", "bias")) else v
            for k, v in sd.items()
        }

    return ["average", "--store", str(_ckpts(tmp, huge)), "--out", str(tmp / "o"), *FAST]


def _unknown_keys(fx, tmp):
    d = _ckpts(tmp, lambda sd: {f"tensor_{i}": v for i, v in enumerate(sd.values())})
    return ["average", "--store", str(d), "--out", str(tmp / "o"), *FAST]


def _cifar_py(tmp: Path, bad: bytes) -> Path:
    d = tmp / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    ok = pickle.dumps(
        {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}, protocol=2
    )
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(bad if name == "data_batch_2" else ok)
    return tmp / "cifar"


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cifar_truncated(fx, tmp):
    good = pickle.dumps(
        {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}, protocol=2
    )
    root = _cifar_py(tmp, good[: len(good) // 2])
    return [
        "average",
        "--dataset",
        "cifar10",
        "--data-root",
        str(root),
        "--store",
        str(fx / "store"),
        "--out",
        str(tmp / "o"),
    ]


def _cifar_evil(fx, tmp):
    evil = pickle.dumps(
        {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(str(tmp / "pwned"))]}, protocol=2
    )
    root = _cifar_py(tmp, evil)
    return [
        "average",
        "--dataset",
        "cifar10",
        "--data-root",
        str(root),
        "--store",
        str(fx / "store"),
        "--out",
        str(tmp / "o"),
    ]


def _user_pkg(tmp: Path, monkeypatch, body: str) -> None:
    pkg = tmp / "pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "user_models_14.py").write_text("import torch\nfrom torch import nn\n\n" + body)
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop("user_models_14", None)


def _input_mismatch(fx, tmp, monkeypatch):
    _user_pkg(
        tmp,
        monkeypatch,
        "def build(num_classes):\n    return nn.Sequential(nn.Linear(10, num_classes))\n",
    )
    return [
        "average",
        "--store",
        str(fx / "store"),
        "--out",
        str(tmp / "o"),
        *FAST,
        "--model",  # after FAST's --model mlp
        "user_models_14:build",
    ]


def _wrong_classes(fx, tmp, monkeypatch):
    _user_pkg(
        tmp, monkeypatch, "def build(input_shape):\n    return nn.Linear(input_shape[0], 3)\n"
    )
    return [
        "average",
        "--store",
        str(fx / "store"),
        "--out",
        str(tmp / "o"),
        *FAST,
        "--model",  # after FAST's --model mlp
        "user_models_14:build",
    ]


def _non_image(fx, tmp, monkeypatch):
    """An ImageFolder with a .png that is not an image, a tiny user model, and its candidates."""
    from PIL import Image

    root = tmp / "images"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")
    (root / "train" / "a" / "notes.png").write_text("not an image")
    _user_pkg(
        tmp,
        monkeypatch,
        "def build(num_classes, input_shape):\n"
        "    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(input_shape[0], num_classes))\n",
    )
    import user_models_14

    store = CandidateStore(tmp / "img_store", create=True)
    for i in range(3):
        torch.manual_seed(i)
        m = user_models_14.build(2, (3, 224, 224))
        layout = Layout.from_module(m)
        store.write(flatten(m, layout), layout, step=i)
    return [
        "average",
        "--dataset",
        "imagefolder",
        "--data-root",
        str(root),
        "--model",
        "user_models_14:build",
        "--store",
        str(tmp / "img_store"),
        "--out",
        str(tmp / "o"),
        "--twa-epochs",
        "1",
        "--mode",
        "t",
        "--no-greedy-soup",
    ]


def _out_holding(kind: str):
    def make(fx, tmp):
        out = tmp / "o"
        out.mkdir()
        if kind == "run":
            (out / "run.json").write_text('{"run_id": "run-earlier"}')
            (out / "metrics.json").write_text("{}")
        else:
            (out / "notes.txt").write_text("mine")
        return ["average", "--store", str(fx / "store"), "--out", str(out), *FAST]

    return make


def _locked(fx, tmp):
    out = tmp / "o"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer holds it (released at exit)
    _locked.fds.append(fd)
    return ["average", "--store", str(fx / "store"), "--out", str(out), *FAST]


_locked.fds = []  # type: ignore[attr-defined]


def _sweep_yaml(sweep: str):
    def make(fx, tmp):
        return ["sweep", "--config", _yaml(tmp, "sweep:\n" + sweep), "--out", str(tmp / "o")]

    return make


def _run_yaml(text: str):
    def make(fx, tmp):
        return ["run", "--config", _yaml(tmp, text), "--out", str(tmp / "o")]

    return make


def _avg(*flags: str):
    def make(fx, tmp):
        return ["average", "--store", str(fx / "store"), "--out", str(tmp / "o"), *FAST, *flags]

    return make


def _run(*flags: str):
    def make(fx, tmp):
        return ["run", "--smoke-test", "--out", str(tmp / "o"), *flags]

    return make


CORPUS = [
    # -- YAML written by hand: types named by key, booleans only from booleans
    pytest.param(
        _run_yaml("sampling: {use_gpu: 'no'}\n"),
        "'sampling.use_gpu': expected true or false",
        id="yaml-string-boolean",
    ),
    pytest.param(
        _run_yaml("compare_full: 'yes'\n"),
        "'compare_full': expected true or false",
        id="yaml-string-boolean-top",
    ),
    pytest.param(
        _run_yaml("data: 5\n"), "'data': expected a mapping", id="yaml-section-not-mapping"
    ),
    pytest.param(
        _run_yaml("twa: {lr: fast}\n"), "'twa.lr': expected a number", id="yaml-word-for-number"
    ),
    pytest.param(
        _run_yaml("sampling: {epochs: '4.5'}\n"),
        "'sampling.epochs': expected an integer",
        id="yaml-fraction-for-integer",
    ),
    pytest.param(
        _run_yaml("sampling: {epochs: true}\n"),
        "'sampling.epochs': expected an integer",
        id="yaml-boolean-for-integer",
    ),
    pytest.param(
        _run_yaml("twa: {lr: [0.1]}\n"), "'twa.lr': expected a number", id="yaml-list-for-number"
    ),
    pytest.param(
        _run_yaml("data: {model: 3}\n"),
        "'data.model': expected a string",
        id="yaml-number-for-string",
    ),
    pytest.param(_run_yaml("mode: tv\n"), "'mode': expected one of", id="yaml-bad-choice"),
    pytest.param(_run_yaml("bogus: 1\n"), "unknown option(s) ['bogus']", id="yaml-unknown-key"),
    pytest.param(
        _run_yaml("twa: {lrr: 0.1}\n"),
        "unknown option(s) ['lrr'] in 'twa'",
        id="yaml-unknown-option",
    ),
    pytest.param(_run_yaml("- a\n- b\n"), "must hold a mapping", id="yaml-list-file"),
    pytest.param(_run_yaml("twa: {lr: [\n"), "is not valid YAML", id="yaml-syntax"),
    pytest.param(
        _run_yaml("sampling: {cpus_per_worker: .nan}\n"),
        "cpus_per_worker=nan",
        id="yaml-nan-resource",
    ),
    pytest.param(
        lambda fx, tmp: ["run", "--config", str(tmp), "--out", str(tmp / "o")],
        "is a folder",
        id="config-is-folder",
    ),
    pytest.param(
        lambda fx, tmp: ["run", "--config", str(tmp / "nope.yaml")],
        "does not exist",
        id="config-missing",
    ),
    pytest.param(
        lambda fx, tmp: ["run", "--config", str(fx / "store" / "step-000000000.arrow")],
        "not a text file",
        id="config-binary",
    ),
    pytest.param(
        _sweep_yaml("  space: {twa.lr: {grid: [0.1]}}\n  num_samples: four\n"),
        "'sweep.num_samples': expected an integer",
        id="sweep-word-for-integer",
    ),
    pytest.param(
        _sweep_yaml("  space: 5\n"),
        "'sweep.space': expected a mapping",
        id="sweep-space-not-mapping",
    ),
    pytest.param(
        _sweep_yaml("  space: {twa.lr: {grid: [0.1]}}\n  reuse_sampling: 'no'\n"),
        "expected true or false",
        id="sweep-string-boolean",
    ),
    pytest.param(
        _sweep_yaml("  space: {twa.lrr: {grid: [0.1]}}\n"), "unknown knob", id="sweep-unknown-knob"
    ),
    pytest.param(
        _sweep_yaml("  space: {twa.lr: {uniform: [1, 0]}}\n"), "lo < hi", id="sweep-bad-range"
    ),
    # -- flags: validated by the same typed models; resources refused before Ray starts
    pytest.param(
        _run("--epochs", "abc"), "(--epochs): expected an integer", id="flag-word-for-integer"
    ),
    pytest.param(_run("--cpus-per-worker", "nan"), "cpus_per_worker=nan", id="flag-nan-cpus"),
    pytest.param(_run("--cpus-per-worker", "inf"), "cpus_per_worker=inf", id="flag-inf-cpus"),
    pytest.param(_run("--cpus-per-worker", "0"), "cpus_per_worker=0.0", id="flag-zero-cpus"),
    pytest.param(
        _run("--checkpoint-interval", "-1"),
        "checkpoint_interval_s=-1.0",
        id="flag-negative-checkpoint-interval",
    ),
    pytest.param(
        _run("--checkpoint-interval", "nan"),
        "checkpoint_interval_s=nan",
        id="flag-nan-checkpoint-interval",
    ),
    pytest.param(_run("--lr", "inf"), "lr=inf", id="flag-inf-lr"),
    pytest.param(_run("--val-frac", "nan"), "val_frac=nan", id="flag-nan-val-frac"),
    pytest.param(_run("--mode", "x"), "invalid choice", id="flag-bad-choice"),
    pytest.param(
        _run("--basis-placement", "everywhere"), "invalid choice", id="flag-bad-placement"
    ),
    pytest.param(_run("--bogus"), "unrecognized arguments", id="flag-unknown"),
    pytest.param(
        _avg("--model", "mlp", "--twa-lr", "1e30"),  # the store holds MLP candidates
        "coefficients hold NaN/Inf",
        id="diverged-coefficients",
    ),
    # -- output folders: owned, inputs never written
    pytest.param(
        _run("--resume", "--overwrite"), "--resume and --overwrite", id="resume-with-overwrite"
    ),
    pytest.param(_run("--resume"), "no run to resume", id="resume-nothing"),
    pytest.param(_out_holding("run"), "already holds a run", id="out-holds-another-command"),
    pytest.param(_out_holding("foreign"), "twa-ray did not write", id="out-holds-foreign-files"),
    pytest.param(
        lambda fx, tmp: ["average", "--store", str(fx / "pt"), "--out", str(fx / "pt"), *FAST],
        "is the --store folder",
        id="out-is-checkpoint-folder",
    ),
    pytest.param(
        lambda fx, tmp: [
            "average",
            "--store",
            str(fx / "store"),
            "--out",
            str(fx / "store" / "avg"),
            *FAST,
        ],
        "inside the --store folder",
        id="out-inside-store",
    ),
    pytest.param(
        lambda fx, tmp: ["average", "--store", str(fx / "pt"), "--out", str(fx), *FAST],
        "holds the --store",
        id="out-holds-input",
    ),
    pytest.param(
        lambda fx, tmp: ["import", str(fx / "pt"), "--out", str(fx / "pt" / "store")],
        "inside the checkpoint folder",
        id="import-into-its-source",
    ),
    pytest.param(_locked, "another twa-ray command is writing", id="out-locked-by-another-writer"),
    # -- stores and checkpoints
    pytest.param(_flip_float, "does not match the stored CRC-32", id="corrupt-float-data"),
    pytest.param(_bad_name, "not candidate names", id="store-file-bad-name"),
    pytest.param(
        lambda fx, tmp: [
            "average",
            "--store",
            f"s3://bkt/x?endpoint_override=127.0.0.1:{free_port()}&scheme=http",
            "--out",
            str(tmp / "o"),
            *FAST,
        ],
        "cannot access candidate store",
        id="unreachable-s3-store",
    ),
    pytest.param(
        lambda fx, tmp: [
            "average",
            "--store",
            str(fx / "pt" / "c0.pt"),
            "--out",
            str(tmp / "o"),
            *FAST,
        ],
        "is a file",
        id="store-is-a-file",
    ),
    pytest.param(
        _unknown_keys,
        "the checkpoint holds 14 tensors (tensor_0",
        id="checkpoint-keys-unrecognised",
    ),
    pytest.param(_overflow, "overflow float32", id="averaging-overflows"),
    # -- datasets and models
    pytest.param(
        _cifar_truncated, "data_batch_2: pickle data was truncated", id="cifar-corrupt-python-batch"
    ),
    pytest.param(_cifar_evil, "refusing to load global", id="cifar-malicious-pickle"),
    pytest.param(_non_image, "is not a readable image", id="imagefolder-non-image"),
    pytest.param(
        _input_mismatch,
        "does not accept the data's inputs of shape [40]",
        id="model-input-size-mismatch",
    ),
    pytest.param(_wrong_classes, "expected [2, 10] logits", id="model-wrong-class-count"),
]

# -- secrets and bounded waits (issue 20): a credential in a URI never reaches the error line;
# a Ray head or an S3 endpoint that does not answer is one line within --connect-timeout
SECRET = "LEAKsecretVALUE0123"


def _s3_at_closed_port(query: str = "") -> str:
    return f"s3://bkt/x?endpoint_override=127.0.0.1:{free_port()}&scheme=http{query}"


CORPUS += [
    pytest.param(
        lambda fx, tmp: [
            "run",
            "--smoke-test",
            "--out",
            str(tmp / "o"),
            "--connect-timeout",
            "2",
            "--storage",
            _s3_at_closed_port().replace("s3://", f"s3://AKIDLEAK0123:{SECRET}@"),
        ],
        "--storage 's3://***@bkt/x?endpoint_override=",
        id="secret-in-uri-of-unreachable-storage",
    ),
    pytest.param(
        lambda fx, tmp: [
            "run",
            "--smoke-test",
            "--out",
            str(tmp / "o"),
            "--storage",
            _s3_at_closed_port(f"&secret_key={SECRET}"),
        ],
        "secret_key=***",
        id="secret-in-uri-query-option",
    ),
    pytest.param(
        lambda fx, tmp: _run("--address", f"127.0.0.1:{free_port()}", "--connect-timeout", "2")(
            fx, tmp
        ),
        "no Ray head answered there within 2 s",
        id="address-that-does-not-answer",
    ),
    pytest.param(
        _run("--connect-timeout", "0"),
        "--connect-timeout / TWA_RAY_CONNECT_TIMEOUT='0' is not a positive number",
        id="connect-timeout-not-positive",
    ),
    pytest.param(
        _run("--connect-timeout", "soon"),
        "is not a positive number of seconds",
        id="connect-timeout-word",
    ),
]


# -- numbers out of range (issue 20): each names its flag (or its key in the file), before Ray starts
_HUGE = "99999999999999999999"  # beyond 64 bits


def _sweep_flags(*flags: str):
    def make(fx, tmp):
        return [
            "sweep",
            "--config",
            _yaml(tmp, "sweep:\n  space: {twa.lr: {grid: [0.1]}}\n"),
            "--out",
            str(tmp / "o"),
            *flags,
        ]

    return make


CORPUS += [
    pytest.param(
        _run("--seed", _HUGE),
        f"seed={_HUGE} (--seed): must lie in [0, ",
        id="flag-seed-beyond-64-bits",
    ),
    pytest.param(
        _avg("--seed", "-1"), "seed=-1 (--seed): must lie in [0, ", id="flag-negative-seed"
    ),
    pytest.param(
        _run("--epochs", _HUGE),
        f"epochs={_HUGE} (--epochs): must fit in 64 bits",
        id="flag-epochs-beyond-64-bits",
    ),
    pytest.param(
        _run("--sample-interval", _HUGE),
        "(--sample-interval): must fit in 64 bits",
        id="flag-interval-beyond-64-bits",
    ),
    pytest.param(
        _run("--batch-size", "-64"),
        "batch_size=-64 (--batch-size): must be >= 1",
        id="flag-negative-batch-size",
    ),
    pytest.param(
        _run("--workers", "-2"),
        "num_workers=-2 (--workers): must be >= 1",
        id="flag-negative-workers",
    ),
    pytest.param(
        _run("--max-failures", "-1"),
        "max_failures=-1 (--max-failures): must be >= 0",
        id="flag-negative-max-failures",
    ),
    pytest.param(
        _run("--num-samples", "-5"),
        "num_samples=-5 (--num-samples): must be >= 100",
        id="flag-negative-num-samples",
    ),
    pytest.param(
        _run("--checkpoint-interval", "1e400"),
        "checkpoint_interval_s=inf (--checkpoint-interval)",
        id="flag-checkpoint-interval-overflows-float",
    ),
    pytest.param(_avg("--twa-epochs", "1e400"), "epochs=inf", id="flag-twa-epochs-overflows-float"),
    pytest.param(
        _run_yaml(f"data: {{seed: {_HUGE}}}\n"),
        f"invalid data config: seed={_HUGE}: must lie in",
        id="yaml-seed-beyond-64-bits",
    ),
    pytest.param(
        _run_yaml("sampling: {batch_size: -64}\n"),
        "invalid sampling config: batch_size=-64: must be >= 1",
        id="yaml-negative-batch-size",
    ),
    pytest.param(
        _sweep_flags("--num-samples", "0"),
        "num_samples=0 (--num-samples): must be >= 1",
        id="sweep-flag-zero-samples",
    ),
    pytest.param(
        _sweep_flags("--max-concurrent", "-1"),
        "max_concurrent=-1 (--max-concurrent)",
        id="sweep-flag-negative-concurrency",
    ),
    pytest.param(
        _sweep_flags("--grace-period", _HUGE),
        "(--grace-period): must fit in 64 bits",
        id="sweep-flag-grace-beyond-64-bits",
    ),
    pytest.param(
        _sweep_flags("--gpus-per-trial", "-1"),
        "gpus_per_trial=-1.0 (--gpus-per-trial): must lie in [0, 64]",
        id="sweep-flag-negative-gpus",
    ),
    pytest.param(
        _sweep_yaml("  space: {twa.lr: {grid: [0.1]}}\n  seed: 4294967296\n"),
        "seed=4294967296: must lie in [0, 4294967295]",
        id="sweep-yaml-seed-beyond-32-bits",
    ),
]


# -- sweep spaces, value by value (issue 21 item 8): refused before Ray starts. RAY_ADDRESS names
# a closed port, so a sweep that reached Ray first would fail on that instead of this line.
def _sweep_space(space: str):
    def make(fx, tmp, monkeypatch):
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
        return _sweep_yaml(f"  space: {space}\n")(fx, tmp)

    return make


CORPUS += [
    pytest.param(
        _sweep_space("{twa.bits: {choice: [3, 4]}}"),
        "invalid sweep space: twa.bits: {choice: [3, 4]}: the value 3 is refused (invalid TWA config: bits=3: use one of",
        id="sweep-choice-bad-value",
    ),
    pytest.param(
        _sweep_space("{twa.bits: {uniform: [1, 8]}}"),
        "twa.bits: {uniform: [1, 8]}: uniform draws fractional numbers but twa.bits takes integer values; use {choice: [..]}",
        id="sweep-uniform-on-integer",
    ),
    pytest.param(
        _sweep_space("{twa.lr: {uniform: [-0.1, 0.1]}}"),
        "twa.lr: {uniform: [-0.1, 0.1]}: the bound -0.1 is refused (invalid TWA config: lr=-0.1: must be a positive number)",
        id="sweep-negative-lr-range",
    ),
    pytest.param(
        _sweep_space("{sampling.lr: {grid: [0.1, fast]}}"),
        "the value 'fast' is refused (config key 'sampling.lr': expected a number",
        id="sweep-word-in-grid",
    ),
    pytest.param(
        _sweep_space("{twa: {lrr: {grid: [0.1]}}}"),
        "unknown knob 'twa.lrr'",
        id="sweep-unknown-nested-knob",
    ),
]


@pytest.mark.parametrize("make,needle", CORPUS)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    fx, tmp_path, capsys, monkeypatch, make, needle
):
    work = tmp_path / "w"
    work.mkdir()
    argv = make(fx, work, monkeypatch) if make.__code__.co_argcount == 3 else make(fx, work)
    inputs = {p: _tree_hash(p) for p in (fx, work)}
    out_before = (work / "o").exists()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("twa-ray: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and needle in err, err
    assert SECRET not in err  # credentials in a URI are masked
    assert (work / "o").exists() == out_before  # a refused command leaves nothing behind
    inputs_after = {p: _tree_hash(p) for p in (fx, work)}
    assert inputs_after == inputs  # stored data unchanged
    assert not (work / "pwned").exists()


# the value options that take a name or a path (not a number): refused by other cases above
_NAMED = {"--config", "--dataset", "--data-root", "--model", "--out", "--store", "--storage"}
_NAMED |= {"--address", "--blocks", "--sampling-dir", "--feature-columns", "--label-column"}


def _numeric_flags(command: str) -> list[str]:
    """Every option of ``twa-ray COMMAND`` that takes a number, not a name, a path or one of a
    few choices (a new one is covered as it is added)."""
    import argparse

    from twa_ray.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return [
        a.option_strings[-1]
        for a in commands.choices[command]._actions
        if type(a) is argparse._StoreAction
        and a.choices is None
        and a.option_strings[-1] not in _NAMED
    ]


_NUMERIC = [(c, f) for c in ("run", "average", "sweep") for f in _numeric_flags(c)]


@pytest.mark.parametrize("value", ["nan", "-1"])
@pytest.mark.parametrize("command,flag", _NUMERIC, ids=[f"{c}{f}" for c, f in _NUMERIC])
def test_every_numeric_flag_refuses_nan_and_negatives_naming_it(
    tmp_path, capsys, monkeypatch, command, flag, value
):
    """No number option takes NaN or -1: exit 2 and one line echoing the value, before anything
    is written or started; NaN names the flag (-1 of a fixed set, ``--bits``, names its key)."""
    given = {
        "run": ["--smoke-test"],
        "average": ["--store", str(tmp_path / "store")],
        "sweep": ["--config", str(Path(__file__).parents[1] / "configs" / "sweep_mnist1d.yaml")],
    }[command]
    # a value taken by mistake fails at once at a closed port, instead of running a job
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    out = tmp_path / "o"
    assert main([command, *given, flag, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twa-ray: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and value in err, err
    key = flag.removeprefix("--").replace("-", "_")
    assert flag in err or (value == "-1" and f"{key}={value}" in err), err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        pytest.param(
            ["run", "--cpus-per-worker", "nan"], "cpus_per_worker=nan", id="subprocess-nan-cpus"
        ),
        pytest.param(
            ["run", "--seed", "99999999999999999999"],
            "seed=99999999999999999999 (--seed)",
            id="subprocess-seed-beyond-64-bits",
        ),
    ],
)
def test_bad_input_as_a_subprocess(tmp_path, argv, needle):
    proc = run_cli([*argv, "--out", str(tmp_path / "o")], timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, (
        proc.stderr
    )
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- what must work


def test_yaml_numeric_strings_are_coerced(fx, tmp_path):
    """``lr: 1e-3`` (PyYAML: a string), ``epochs: "40"``, sweep ``num_samples: "4"``."""
    from twa_ray.config import load_config, load_sweep_config

    cfg = load_config(
        _yaml(tmp_path, "twa: {lr: 1e-3}\nsampling: {epochs: '40', cpus_per_worker: '0.5'}\n")
    )
    assert cfg.twa.lr == 0.001 and cfg.sampling.epochs == 40 and cfg.sampling.cpus_per_worker == 0.5
    sweep = load_sweep_config(
        _yaml(tmp_path, "sweep:\n  space: {twa.lr: {grid: [0.1]}}\n  num_samples: '4'\n")
    )
    assert sweep.num_samples == 4


def test_safetensors_imported_without_model_then_averaged(fx, tmp_path, capsys):
    """Alphabetical tensor order (no --model at import) is matched by name at average."""
    store = tmp_path / "imported"
    assert main(["import", str(fx / "st"), "--out", str(store)]) == 0
    assert (
        CandidateStore(store).layout.names
        != Layout.from_module(build_model("mlp", num_classes=10, input_shape=(40,))).names
    )
    assert main(["average", "--store", str(store), "--out", str(tmp_path / "o"), *FAST]) == 0
    assert f"outputs in {tmp_path / 'o'}" in capsys.readouterr().out


def test_lightning_checkpoints_are_recognised(fx, tmp_path):
    assert (
        main(["average", "--store", str(fx / "lightning"), "--out", str(tmp_path / "o"), *FAST])
        == 0
    )
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["num_candidates"] == 4


def test_imports_are_keyed_by_content(fx, tmp_path, capsys):
    """A second average of other checkpoints into the same --out (with --overwrite) imports
    them; the same checkpoints reuse the import; the config names the folder averaged."""
    out = tmp_path / "o"
    assert main(["average", "--store", str(fx / "pt"), "--out", str(out), *FAST]) == 0
    first = json.loads((out / "import.json").read_text())
    assert (
        main(["average", "--store", str(fx / "pt"), "--out", str(out), *FAST]) == 2
    )  # owned: refused
    capsys.readouterr()
    assert (
        main(["average", "--store", str(fx / "pt"), "--out", str(out), "--overwrite", *FAST]) == 0
    )
    assert "reusing the candidates imported" in capsys.readouterr().out  # progress: stdout
    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):  # other checkpoints: different names, sizes and digests
        (other / f"x{i}.pt").write_bytes((fx / "pt" / f"c{i + 1}.pt").read_bytes())
    assert main(["average", "--store", str(other), "--out", str(out), "--overwrite", *FAST]) == 0
    second = json.loads((out / "import.json").read_text())
    assert second != first and second["source"] == str(other.resolve())
    assert sorted(CandidateStore(out / "candidates").names()) == ["x0", "x1", "x2"]
    assert str(other) in (out / "config.yaml").read_text()
    assert json.loads((out / "average.json").read_text())["command"] == "average"


def test_overwrite_replaces_another_commands_output(fx, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text('{"run_id": "run-x"}')
    (out / "metrics.json").write_text("{}")
    assert (
        main(["average", "--store", str(fx / "store"), "--out", str(out), "--overwrite", *FAST])
        == 0
    )
    assert not (out / "run.json").exists() and (out / "average.json").exists()


# --------------------------------------------------------------------------- owner: --storage and stores (issues 23, 20)


def _storage_holding_foreign(*extra: str):
    def make(fx, tmp):
        st = tmp / "st"
        (st / "sub").mkdir(parents=True)
        (st / "data.csv").write_text("a,b\n")
        (st / "sub" / "x.txt").write_text("mine")
        return ["run", "--smoke-test", "--storage", str(st), "--out", str(tmp / "o"), *extra]

    return make


def _leased(command: str):
    """A location that a live command (the parent process: alive, this host) is writing."""

    def make(fx, tmp):
        import time

        from twa_ray.outdir import LEASE

        st = tmp / "st"
        st.mkdir()
        lease = {
            "command": command,
            "run_id": f"{command}-live",
            "host": socket.gethostname(),
            "pid": os.getppid(),
            "token": "t",
            "ttl_s": 600,
            "renewed": time.time(),
        }
        (st / LEASE).write_text(json.dumps(lease))
        if command == "import":
            return ["import", str(fx / "pt"), "--out", str(st)]
        (st / "run.json").write_text(json.dumps({"command": "run", "run_id": "run-live"}))
        return ["run", "--smoke-test", "--storage", str(st), "--out", str(tmp / "o"), "--resume"]

    return make


@pytest.mark.parametrize(
    "make,needle",
    [
        pytest.param(
            _storage_holding_foreign(),
            "holds files twa-ray did not write (data.csv, sub)",
            id="storage-holds-foreign-files",
        ),
        pytest.param(
            _storage_holding_foreign("--overwrite"),
            "choose a new or empty --storage",
            id="storage-overwrite-foreign-files",
        ),
        pytest.param(
            _leased("run"), "is being written by run run-live", id="storage-written-by-a-live-run"
        ),
        pytest.param(
            _leased("import"),
            "is being written by import import-live",
            id="import-into-a-store-being-imported",
        ),
    ],
)
def test_storage_bad_input_is_one_line_exit_2_and_changes_nothing(
    fx, tmp_path, capsys, monkeypatch, make, needle
):
    import ray

    test_bad_input_is_one_line_exit_2_and_changes_nothing(
        fx, tmp_path, capsys, monkeypatch, make, needle
    )
    assert not ray.is_initialized()  # refused before Ray starts


# --------------------------------------------------------------------------- Hugging Face folders
# (integ) A tiny ViT saved with save_pretrained; the data function of tests/integrations/tiny_hf.py.
HF_DATA = ["--dataset", "tests.integrations.tiny_hf:images"]


def _vit_folder(tmp: Path, name: str, **kw) -> Path:
    from tests.integrations.tiny_hf import vit

    model = vit()
    if kw:
        from transformers import ViTForImageClassification

        model = ViTForImageClassification(
            model.config.__class__(**{**model.config.to_dict(), **kw})
        )
    model.save_pretrained(tmp / name, max_shard_size="40KB")
    return tmp / name


def _hf_no_config(fx, tmp):
    folder = _vit_folder(tmp / "src", "vit")
    (folder / "config.json").unlink()
    return [
        "average",
        "--store",
        str(tmp / "src"),
        "--model",
        f"hf:{folder}",
        *HF_DATA,
        "--out",
        str(tmp / "o"),
        *FAST[2:],  # its own --model, not FAST's mlp
    ]


def _hf_missing_shard(fx, tmp):
    ref = _vit_folder(tmp, "ref")
    folder = _vit_folder(tmp / "src", "vit")
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    return ["import", str(tmp / "src"), "--out", str(tmp / "o"), "--model", f"hf:{ref}", *HF_DATA]


def _hf_architecture_mismatch(fx, tmp):
    other = _vit_folder(tmp, "wide", hidden_size=48)
    _vit_folder(tmp / "src", "vit")
    return [
        "average",
        "--store",
        str(tmp / "src"),
        "--model",
        f"hf:{other}",
        *HF_DATA,
        "--out",
        str(tmp / "o"),
        *FAST[2:],  # its own --model, not FAST's mlp
    ]


HF_CORPUS = [
    pytest.param(_hf_no_config, "config.json does not exist", id="hf-folder-without-config"),
    pytest.param(_hf_missing_shard, "names shard(s)", id="hf-index-names-missing-shard"),
    pytest.param(_hf_architecture_mismatch, "expected [", id="hf-architecture-mismatch"),
]


@pytest.mark.parametrize("make,needle", HF_CORPUS)
def test_bad_hf_input_is_one_line_exit_2_and_changes_nothing(
    fx, tmp_path, capsys, monkeypatch, make, needle
):
    pytest.importorskip("transformers")
    test_bad_input_is_one_line_exit_2_and_changes_nothing(
        fx, tmp_path, capsys, monkeypatch, make, needle
    )

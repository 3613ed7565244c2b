"""Result files (issue 21): tied weights written once and loaded back, the process umask, the
winner named in metrics.json, results kept when a later output fails, `--config` repeats a run."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli_argv, cli_env, run_cli
from safetensors.torch import load_file, load_model, save_model

from twa_ray.cli import main
from twa_ray.core.layout import Layout
from twa_ray.report import (
    SAVABLE_BY,
    best_method,
    plot_coefficients,
    write_coefficients,
    write_json,
    write_model,
)
from twa_ray.storage import open_storage
from twa_ray.store import CandidateStore

HERE = Path(__file__).resolve().parent
NUM_SAMPLES = "800"


@pytest.fixture
def tied(monkeypatch):
    """The BYO tied-embedding model module (``--model tied_model:build``)."""
    monkeypatch.syspath_prepend(str(HERE))
    import tied_model

    return tied_model


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tied_model_written_once_and_loaded_back_with_load_model(tmp_path, tied):
    model = tied.build(10, (40,))
    write_model(tmp_path / "model.safetensors", model, {"format": "pt"})
    on_disk = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" in on_disk and "wte.weight" not in on_disk  # save_model's choice
    fresh = tied.build(10, (40,))
    load_model(fresh, tmp_path / "model.safetensors")
    assert fresh.lm_head.weight is fresh.wte.weight
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_result_files_follow_the_umask(tmp_path, tied, umask):
    """A writer's own 0600 (safetensors') is not kept: under umask 022 every result file is
    0644, under 027 0640, candidates and the storage's run.json included."""
    for mask, want in ((0o022, 0o644), (0o027, 0o640)):
        umask(mask)
        out = tmp_path / f"m{mask:o}"
        out.mkdir()
        write_json(out / "metrics.json", {"a": 1})
        write_model(out / "model.safetensors", tied.build(10, (40,)), {})
        alpha = {"twa_v": torch.ones(2, 1)}
        write_coefficients(out / "coefficients.parquet", alpha, block_labels=["b"])
        plot_coefficients(
            out / "coefficients_twa_v.png", alpha["twa_v"], block_labels=["b"], title="t"
        )
        open_storage(str(out)).write_json("run.json", {"run_id": "r"})
        lin = torch.nn.Linear(2, 2)
        CandidateStore(out / "candidates", create=True).write(
            lin.state_dict(), Layout.from_module(lin), step=0
        )
        files = [p for p in out.rglob("*") if p.is_file()]
        assert len(files) == 6 and {p.name: _mode(p) for p in files} == {
            p.name: want for p in files
        }


def test_best_is_the_highest_validation_accuracy_and_the_saved_model_is_named_apart():
    methods = {
        "sgd_sampled": {"val_acc": 0.5, "test_acc": 0.9},
        "swa": {"val_acc": 0.7, "test_acc": 0.1},
        "twa_t": {"val_acc": 0.6},
        "twa_v": {"val_acc": 0.7},
    }
    assert best_method(methods, saved_model="twa_v") == {
        "best": "swa",
        "best_split": "val",
        "saved_model": "twa_v",
    }


def _checkpoints(tied, root: Path, *, one_name: bool) -> Path:
    root.mkdir()
    for seed in range(3):
        torch.manual_seed(seed)
        model = tied.build(10, (40,))
        if one_name:
            save_model(model, str(root / f"step={seed * 50}.safetensors"))
        else:
            torch.save(model.state_dict(), root / f"step={seed * 50}.pt")
    return root


AVERAGE = [
    "--model",
    "tied_model:build",
    "--num-samples",
    NUM_SAMPLES,
    "--mode",
    "both",
    "--twa-epochs",
    "1",
    "--no-greedy-soup",
]


def test_tied_model_through_import_and_average(tmp_path, tied, capsys):
    """torch.save (both names) and save_model (one name) folders import; average writes a model
    that load_model reads back, and metrics.json names the best method and the saved one."""
    one = _checkpoints(tied, tmp_path / "one", one_name=True)
    assert (
        main(["import", str(one), "--out", str(tmp_path / "store"), "--model", "tied_model:build"])
        == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("ordered by file name: step_0, step_50, step_100"), line
    both = _checkpoints(tied, tmp_path / "both", one_name=False)
    out = tmp_path / "avg"
    assert main(["average", "--store", str(both), *AVERAGE, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["numel"] == Layout.from_module(tied.build(10, (40,))).numel
    )  # the tie counted once
    assert metrics["saved_model"] in ("twa_t", "twa_v") and metrics["best_split"] == "val"
    val = {k: m["val_acc"] for k, m in metrics["methods"].items()}
    assert val[metrics["best"]] == max(val.values())
    model = tied.build(10, (40,))
    load_model(model, out / "model.safetensors")
    assert model.lm_head.weight is model.wte.weight


def test_a_failing_output_keeps_the_computed_results(tmp_path, tied, capsys):
    """A model safetensors cannot store (a buffer viewing a parameter): one line, exit 2, and
    metrics.json, config.yaml and the coefficients stay in --out (it used to be removed)."""
    both = _checkpoints(tied, tmp_path / "both", one_name=False)
    out = tmp_path / "avg"
    argv = ["average", "--store", str(both), *AVERAGE, "--out", str(out)]
    argv[argv.index("tied_model:build")] = "tied_model:build_view"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "are kept" in err[0], err
    kept = {p.name for p in out.iterdir()}
    assert {"metrics.json", "config.yaml", "coefficients.parquet", "candidates"} <= kept, kept
    assert "model.safetensors" not in kept


@pytest.mark.ray
@pytest.mark.slow
def test_run_with_a_tied_model_then_its_config_repeats_into_a_new_out(tmp_path):
    """`twa-ray run --smoke-test --model tied_model:build` (umask 022) writes a model load_model
    reads, files 0644; its config.yaml pins no store, so `--config OUT/config.yaml --out NEW`
    resolves to NEW/candidates (the repeat itself is the same command: not run again here), and
    without --out it is refused before Ray starts: only --resume continues a run."""
    env = cli_env(HERE)
    out = tmp_path / "run"
    cli = " ".join(
        cli_argv("run", "--smoke-test", "--model", "tied_model:build", "--out", str(out))
    )
    cmd = f"umask 022 && {cli}"
    proc = subprocess.run(
        ["bash", "-c", cmd], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(HERE))
    try:
        import tied_model
    finally:
        sys.path.remove(str(HERE))
    model = tied_model.build(10, (40,))
    load_model(model, out / "model.safetensors")
    assert model.lm_head.weight is model.wte.weight
    assert {p.name: _mode(p) for p in out.iterdir() if p.is_file()} == {
        p.name: 0o644 for p in out.iterdir() if p.is_file()
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["saved_model"] in SAVABLE_BY["run"] and metrics["best"] in metrics["methods"]
    from twa_ray.cli import build_parser, config_from_args

    saved = (out / "config.yaml").read_text()
    assert "store: null" in saved and "run-" not in saved
    new = tmp_path / "new"
    cfg = config_from_args(
        build_parser().parse_args(["run", "--config", str(out / "config.yaml"), "--out", str(new)])
    )
    assert (
        cfg.store is None
        and cfg.store_uri == f"{new}/candidates"
        and cfg.data.model == "tied_model:build"
    )
    proc = run_cli(
        ["run", "--config", str(out / "config.yaml")], env=env, cwd=tmp_path, timeout=300
    )
    assert (
        proc.returncode == 2 and "already holds a run" in proc.stderr and "--resume" in proc.stderr
    )  # same --out

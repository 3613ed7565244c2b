"""End to end: the main job at tiny size on a real local Ray (2 CPUs, 2 workers)."""

import json

import pytest

from twa_ray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_run_smoke_end_to_end(ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--smoke-test", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    methods = metrics["methods"]
    assert set(methods) >= {"sgd_sampled", "swa", "twa_t", "twa_v"}
    for m in methods.values():
        assert 0.0 <= m["test_acc"] <= 1.0
    assert methods["twa_t"]["alpha_identical"] and methods["twa_v"]["alpha_identical"]
    rows, blocks = metrics["subspace"]["num_rows"], metrics["subspace"]["num_blocks"]
    assert metrics["bytes_allreduced_per_step"] == rows * blocks * 4
    assert metrics["epochs_used"] == 3 and metrics["budget_saved"] == pytest.approx(0.25)
    for name in ("model.safetensors", "coefficients.parquet", "accuracy.png", "config.yaml"):
        assert (out / name).stat().st_size > 0
    table = capsys.readouterr().out
    assert "| twa_v" in table and "budget_saved_%" in table

    # the same --out again: refused unless --resume / --overwrite
    assert main(["run", "--smoke-test", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err

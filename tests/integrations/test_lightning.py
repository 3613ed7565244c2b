"""The Lightning callback: examples/lightning_single.py on one process and under ddp (gloo)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "lightning_single.py")


def run_example(out, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, EXAMPLE, "--out", str(out), "--n-train", "1024", *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_single")
    return out, run_example(out, "--batch-size", "32")


@pytest.mark.slow
def test_callback_twa_beats_the_shortened_run(single):
    out, result = single
    assert result["twa/num_candidates"] == 4  # stopped at 4 of 8 epochs, one snapshot per epoch
    assert result["twa/twa_loss"] < result["twa/final_loss"]
    assert result["twa/twa_acc"] > result["twa/final_acc"]
    assert "twa/swa_acc" in result  # SWA of the same candidates, next to it
    logged = (out / "logs" / "version_0" / "metrics.csv").read_text()
    assert "twa/twa_acc" in logged  # through the trainer's logger


@pytest.mark.slow
def test_ddp_learns_the_same_alpha(single, tmp_path):
    """2 gloo processes of 16 examples per batch see the same 32-example batches as the single
    run (DistributedSampler without shuffling interleaves them): the per-rank coefficient
    gradients, averaged, give the single run's alpha. The candidates are the single run's
    (already in the store: the callback does not write a step twice)."""
    out, result = single
    store = out / "candidates"
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    ddp = run_example(tmp_path, "--batch-size", "16", "--devices", "2", "--strategy", "ddp",
                      "--store", str(store))  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before
    import torch

    torch.testing.assert_close(torch.tensor(ddp["alpha"]), torch.tensor(result["alpha"]), rtol=1e-5, atol=1e-7)

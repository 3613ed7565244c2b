"""The Lightning callback: examples/lightning_single.py on one process and under ddp (gloo)."""

import pytest
import torch

from tests.integrations.conftest import LIGHTNING_ARGS, run_example

pytest.importorskip("lightning")


@pytest.mark.slow
def test_callback_twa_beats_the_shortened_run(lightning_single):
    out, result = lightning_single
    assert result["twa/num_candidates"] == 4  # stopped at 4 of 8 epochs, one snapshot per epoch
    assert result["twa/twa_loss"] < result["twa/final_loss"]
    assert result["twa/twa_acc"] > result["twa/final_acc"]
    assert "twa/swa_acc" in result  # SWA of the same candidates, next to it
    # held out (TWA-v fits on val): the TWA model beats the final SGD weights on the test split
    assert result["test/twa_acc"] > result["test/final_acc"]
    assert "test/swa_acc" in result
    logged = (out / "logs" / "version_0" / "metrics.csv").read_text()
    assert "twa/twa_acc" in logged  # through the trainer's logger


@pytest.mark.slow
def test_ddp_learns_the_same_alpha(lightning_single, tmp_path):
    """2 gloo processes of 16 examples per batch see the same 32-example batches as the single
    run (DistributedSampler without shuffling interleaves them): the per-rank coefficient
    gradients, averaged, give the single run's alpha. The candidates are the single run's
    (already in the store: the callback does not write a step twice)."""
    out, result = lightning_single
    store = out / "candidates"
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    ddp = run_example(
        "lightning_single.py",
        tmp_path,
        *LIGHTNING_ARGS,
        "--batch-size",
        "16",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--store",
        str(store),
    )
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before
    torch.testing.assert_close(
        torch.tensor(ddp["alpha"]), torch.tensor(result["alpha"]), rtol=1e-5, atol=1e-7
    )

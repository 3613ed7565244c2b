"""The callbacks inside Ray Train (TorchTrainer, 2 workers on the module's local Ray)."""

import json

import pytest
import torch

from tests.integrations.conftest import LIGHTNING_ARGS, load_example

pytest.importorskip("lightning")


@pytest.mark.ray
@pytest.mark.slow
def test_lightning_in_ray_train_learns_the_same_alpha(ray_cluster, lightning_single, tmp_path):
    """RayDDPStrategy on 2 workers, 16 examples each per batch, over the single run's candidates:
    the same alpha as the single process (see test_lightning.test_ddp_learns_the_same_alpha)."""
    out, result = lightning_single
    example = load_example("lightning_ray_train.py")
    example.main(
        [
            "--out",
            str(tmp_path),
            *LIGHTNING_ARGS,
            "--batch-size",
            "16",
            "--num-workers",
            "2",
            "--store",
            str(out / "candidates"),
        ]
    )
    got = json.loads((tmp_path / "result.json").read_text())
    torch.testing.assert_close(
        torch.tensor(got["alpha"]), torch.tensor(result["alpha"]), rtol=1e-5, atol=1e-7
    )


@pytest.mark.ray
@pytest.mark.slow
def test_hf_trainer_in_ray_train_learns_the_same_alpha(ray_cluster, hf_single, tmp_path):
    """2 workers with RayTrainReportCallback, 16 examples each per eval batch: accelerate hands
    rank r the eval batches r, r + 2, ..., so each step's two batches are the single run's one
    batch of 32; over the single run's candidates the same alpha comes out."""
    pytest.importorskip("transformers")
    out, result = hf_single
    example = load_example("hf_trainer.py")
    example.main(
        [
            "--out",
            str(tmp_path),
            "--batch-size",
            "16",
            "--num-workers",
            "2",
            "--store",
            str(out / "twa_candidates"),
        ]
    )
    got = json.loads((tmp_path / "result.json").read_text())
    # BERT's matmuls round 2 x 16 rows differently from 32; over 4 TWA epochs at lr 0.1 that leaves
    # ~3e-6 on coefficients near 0: rtol 1e-5 plus torch's float32 atol (1e-5) for those
    torch.testing.assert_close(
        torch.tensor(got["alpha"]), torch.tensor(result["alpha"]), rtol=1e-5, atol=1e-5
    )

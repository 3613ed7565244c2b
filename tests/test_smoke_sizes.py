"""Smoke sizes come from one definition (issue 30 item 5): ``run --smoke-test``, ``sweep
--smoke-test`` and the jobs size a config the same way, so a config a smoke sweep ran (its
``best.yaml``) runs again at smoke size. The end-to-end case (a smoke sweep, then ``twa-ray run
--config S/best.yaml --smoke-test``) is the README's "Sweeps" block, run at the coarsest interval:
tests/test_readme.py::test_the_sweeps_block_reruns_its_winner_at_smoke_size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from twa_ray.cli import build_parser, config_from_args, sweep_config_from_args
from twa_ray.config import SMOKE_RUN, config_from_dict, smoke_sizes, with_keys

ROOT = Path(__file__).resolve().parents[1]


def _candidates(cfg) -> int:
    """The candidates an epoch-interval run writes: one every interval, up to its stop."""
    s = cfg.sampling
    return s.sample_epochs // s.sample_interval


def test_the_run_smoke_size_is_unchanged_for_the_default_config():
    args = build_parser().parse_args(["run", "--smoke-test"])
    cfg = config_from_args(args, smoke_test=True)
    s = cfg.sampling
    assert (cfg.data.num_samples, s.epochs, s.sample_frac, s.batch_size) == (1500, 4, 0.5, 64)
    assert cfg.twa.epochs == 1.0 and cfg.greedy_soup is False and _candidates(cfg) == 2


@pytest.mark.parametrize("interval", [1, 2, 4, 8])
def test_run_smoke_adapts_the_epochs_to_the_interval(tmp_path, interval):
    """A run config with a coarse epoch interval (a sweep's winner) still gets the smoke
    test's candidates; a flag still overrides the smoke size."""
    cfg = config_from_dict({"sampling": {"sample_interval": interval, "epochs": 40}})
    sized = smoke_sizes(cfg)
    assert sized["sampling.epochs"] == 4 * interval
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump({"sampling": {"sample_interval": interval, "epochs": 40}}))
    args = build_parser().parse_args(["run", "--config", str(path), "--smoke-test"])
    assert _candidates(config_from_args(args, smoke_test=True)) == SMOKE_RUN.candidates
    flag = build_parser().parse_args(
        ["run", "--config", str(path), "--smoke-test", "--sample-interval", "1", "--epochs", "6"]
    )
    run = config_from_args(flag, smoke_test=True)
    assert (run.sampling.epochs, run.sampling.sample_interval) == (6, 1)


def test_every_config_of_a_smoke_sweep_reruns_at_smoke_size():
    """Each trial a smoke sweep of the default sweep file can draw, saved as its best.yaml and
    run with --smoke-test, has at least 2 candidates; the sweep's own sizes are unchanged."""
    args = build_parser().parse_args(
        [
            "sweep",
            "--config",
            str(ROOT / "configs/sweep_mnist1d.yaml"),
            "--out",
            "S",
            "--smoke-test",
        ]
    )
    sweep = sweep_config_from_args(args)
    s = sweep.base.sampling
    assert (s.epochs, s.sample_frac, s.batch_size, sweep.base.twa.epochs) == (32, 0.5, 64, 2.0)
    assert sweep.num_samples == 2 and sweep.base.data.num_samples == 1500
    for interval in sweep.space["sampling.sample_interval"]["choice"]:
        for frac in sweep.space["sampling.sample_frac"]["choice"]:
            sampling = dataclasses.replace(s, sample_interval=interval, sample_frac=frac)
            trial = dataclasses.replace(sweep.base, sampling=sampling)
            assert _candidates(trial) >= 2  # the trial itself had 2 candidates or more
            best = config_from_dict(trial.to_dict())  # its best.yaml
            assert _candidates(with_keys(best, smoke_sizes(best))) == 2, (interval, frac)

"""``twa-ray run --strategy fsdp``: FSDP2 sampling with sharded snapshots on a real local Ray
(2 CPUs, 2 workers), a worker failure resumed from the per-rank checkpoint, against the same
smoke run with DDP; and the refusals of what fsdp does not run yet (no Ray)."""

import contextlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from twa_ray.cli import main
from twa_ray.ray.faults import FAULTS_ENV
from twa_ray.store import CandidateStore

SMOKE = ["run", "--smoke-test", "--mode", "v", "--no-greedy-soup", "--checkpoint-interval", "0"]


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """The same smoke run with the default DDP and with ``--strategy fsdp``, whose last rank
    fails once mid-sampling (step 20 of 32: every rank restarts from its shards of the epoch-1
    checkpoint) and once in the sharded coefficient phase (after step 10: alpha and its optimizer
    resume, each rank rebuilds its B_r from the store): their out dirs."""
    out = {}
    faults = tmp_path_factory.mktemp("fault")
    plan = [
        {"phase": "sampling", "kind": "raise", "step": 20, "marker": str(faults / "sampling")},
        {"phase": "coefficients", "kind": "raise", "step": 10, "marker": str(faults / "coeff")},
    ]
    for strategy in ("ddp", "fsdp"):
        out[strategy] = tmp_path_factory.mktemp(strategy) / "run"
        argv = [*SMOKE, "--strategy", strategy, "--out", str(out[strategy])]
        if strategy == "fsdp":
            argv += ["--max-failures", "2"]
            with open(os.environ[FAULTS_ENV], "w") as f:
                json.dump(plan, f)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv) == 0
        finally:
            if os.path.exists(os.environ[FAULTS_ENV]):
                os.remove(os.environ[FAULTS_ENV])
    # both faults fired (and the run went on from the checkpoints)
    assert (faults / "sampling").exists() and (faults / "coeff").exists()
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_fsdp_run_writes_sharded_candidates_equal_to_ddp(runs):
    fsdp = CandidateStore(runs["fsdp"] / "candidates")
    ddp = CandidateStore(runs["ddp"] / "candidates")
    names = fsdp.names()
    assert names == ddp.names() and len(names) >= 2
    for name in names:
        parts = sorted(p.name for p in (runs["fsdp"] / "candidates" / f"{name}.parts").iterdir())
        assert parts == ["part-00000-of-00002.arrow", "part-00001-of-00002.arrow"]
        assert fsdp._header(name).sharded is not None
        # the same schedule, data order and mean gradient: the same weights, bit for bit
        assert torch.equal(fsdp.read(name), ddp.read(name)), name
        for r in range(2):  # each rank's rows, and resharded to one rank
            assert torch.equal(fsdp.read_local(name, r, 2), ddp.read_local(name, r, 2))
        assert torch.equal(fsdp.read_local(name, 0, 1), ddp.read(name))


@pytest.mark.ray
@pytest.mark.slow
def test_fsdp_run_reports_what_ddp_reports(runs):
    """Evaluation on the sharded workers (BN statistics broadcast from rank 0 as DDP does), the
    per-shard EMAs gathered at the end, and the coefficient phase after them: the same numbers."""
    got, want = (json.loads((runs[s] / "metrics.json").read_text()) for s in ("fsdp", "ddp"))
    assert set(got["methods"]) == set(want["methods"]) >= {"sgd_sampled", "swa", "ema", "twa_v"}
    for name, m in want["methods"].items():
        for key in ("test_acc", "val_acc"):
            assert got["methods"][name][key] == pytest.approx(m[key], abs=1e-9), (name, key)
    assert got["methods"]["ema"]["decay"] == want["methods"]["ema"]["decay"]


@pytest.mark.ray
@pytest.mark.slow
def test_fsdp_run_learns_the_alpha_ddp_learns(runs):
    """The coefficients TWA-v learned on the sharded model (each rank its columns of B, a
    restart in between): the DP run's, within float32 reduction order (rtol 1e-5), row by row
    and block by block; the weights the driver joined from the ranks' shards: the DP run's."""
    got, want = (
        pq.read_table(runs[s] / "coefficients.parquet").to_pandas() for s in ("fsdp", "ddp")
    )
    keys = ["variant", "row", "block"]
    got, want = (t.sort_values(keys).reset_index(drop=True) for t in (got, want))
    assert len(want) > 0 and set(want.variant) == {"twa_v"}
    assert got[keys + ["block_label"]].equals(want[keys + ["block_label"]])
    np.testing.assert_allclose(got.alpha, want.alpha, rtol=1e-5, atol=0)
    fsdp, ddp = (json.loads((runs[s] / "metrics.json").read_text()) for s in ("fsdp", "ddp"))
    phase = fsdp["coefficient_phase"]
    assert phase["basis_placement"] == "fsdp"  # rank 0 held its columns of B only
    assert 0 < phase["basis_held_bytes"] < ddp["coefficient_phase"]["basis_held_bytes"]
    got_w, want_w = (load_file(runs[s] / "model.safetensors") for s in ("fsdp", "ddp"))
    assert got_w.keys() == want_w.keys()
    for k, v in want_w.items():
        torch.testing.assert_close(got_w[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_fsdp_with_compare_full_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--strategy", "fsdp", "--compare-full", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compare-full with --strategy fsdp" in err[0]
    assert not out.exists()  # refused before anything is written


def test_unknown_strategy_is_a_usage_error(tmp_path, capsys):
    assert main(["run", "--strategy", "mpi", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strategy: invalid choice: 'mpi'" in err[0]

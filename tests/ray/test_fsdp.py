"""``twa-ray run --strategy fsdp``: FSDP2 sampling with sharded snapshots on a real local Ray
(2 CPUs, 2 workers), a worker failure resumed from the per-rank checkpoint, against the same
smoke run with DDP; the final model written sharded (safetensors shards + index; a tiny
Hugging Face GPT-2 with tied embeddings loaded back by ``from_pretrained``, 2 gloo processes, no
Ray); and the refusals of what fsdp does not run yet (no Ray)."""

import contextlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import spawn_gloo
from safetensors.torch import load_file

from twa_ray.cli import main
from twa_ray.core.bn import bn_state
from twa_ray.core.layout import Layout, flatten
from twa_ray.core.sharded import LocalShards
from twa_ray.ray.faults import FAULTS_ENV
from twa_ray.ray.fsdp_output import INDEX, output_files
from twa_ray.store import CandidateStore
from twa_ray.store.importers import load_state_dict

SMOKE = ["run", "--smoke-test", "--mode", "v", "--no-greedy-soup", "--checkpoint-interval", "0"]
SMOKE += ["--save", "twa_v"]  # the fsdp run's model: written sharded by the workers


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
    want_w = load_file(runs["ddp"] / "model.safetensors")
    got_w = sharded_model(runs["fsdp"], world=2)
    assert got_w.keys() == want_w.keys()
    for k, v in want_w.items():
        if k.endswith("num_batches_tracked"):
            # a counter, not a weight (bn_state holds the means and variances): the DDP model's
            # is left from the driver's last BN re-estimation, the sharded one's from the worker's
            continue
        torch.testing.assert_close(got_w[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # what twa-ray import / average read a model folder with: the same tensors
    read = load_state_dict(runs["fsdp"])
    assert read.keys() == got_w.keys()
    assert all(torch.equal(read[k], v) for k, v in got_w.items())


def sharded_model(folder, world):
    """The tensors of the sharded model in ``folder``, after checking its files: one per rank,
    no model.safetensors, every tensor in the file the index names, the index's total size."""
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{r:05d}-of-{world:05d}.safetensors" for r in range(1, world + 1)]
    state = {}
    for f in files:
        part = load_file(folder / f)
        assert all(index["weight_map"][k] == f for k in part) and not state.keys() & part.keys()
        state.update(part)
    assert state.keys() == index["weight_map"].keys()
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == total
    return state


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


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=16, n_embd=24, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()  # lm_head.weight tied to transformer.wte.weight


def _write_gpt2_shards(rank: int, world: int, folder: str) -> None:
    """Rank ``rank``'s files of the tiny GPT-2 from its dim-0 rows only (what a sharded run's
    worker holds), written into ``folder``."""
    model = _tiny_gpt2()
    shards = LocalShards.from_layout(Layout.from_module(model), world, rank)
    theta = shards.restrict(flatten(model, shards.layout))
    files = output_files(model, shards, {"m": {"theta": theta, "bn_state": bn_state(model)}})
    for name, obj in files.items():
        path = os.path.join(folder, os.path.basename(name))
        if name.endswith(".json"):
            with open(path, "w") as f:
                json.dump(obj, f)
        else:
            with open(path, "wb") as f:
                f.write(obj)


@pytest.mark.slow
def test_sharded_output_loads_with_from_pretrained(tmp_path):
    """A GPT-2 with tied embeddings written by 2 gloo ranks from their rows (97 vocabulary rows: 49 + 48): the tied weight
    once (``save_pretrained``'s form), ``from_pretrained`` gives the model back bit for bit."""
    from transformers import GPT2LMHeadModel

    spawn_gloo(_write_gpt2_shards, 2, tmp_path, str(tmp_path))
    want = _tiny_gpt2()
    want.config.save_pretrained(tmp_path)
    state = sharded_model(tmp_path, world=2)
    assert "transformer.wte.weight" in state and "lm_head.weight" not in state
    got = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert got.lm_head.weight.data_ptr() == got.transformer.wte.weight.data_ptr()
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k

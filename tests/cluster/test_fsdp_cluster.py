"""FSDP2 on the head + 3 worker nodes (harness.py): ``twa-ray run --strategy fsdp`` and a plain
Ray Train loop (``twa_ray.train.snapshot`` / ``learn`` on a ``fully_shard``-ed model), one rank
per worker node, every artifact in S3. Neither gathers the model on a worker: each rank writes
its rows of every candidate (a part each) and learns alpha with its columns of B."""

from __future__ import annotations

import json
from pathlib import Path

import fsdp_loop_job as loop
import numpy as np
import pytest
import torch
from harness import coefficients, submit, train_nodes

import twa_ray.train
from twa_ray.core.layout import Layout
from twa_ray.store import CandidateStore

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WORKERS = 3  # one per worker node (1 CPU each)
RUN = ["python", "jobs/run_twa.py", "--smoke-test", "--mode", "v", "--workers", str(WORKERS)]


def _explain(res) -> str:
    return f"job {res.job_id}: {res.status} after {res.wall_s:.0f} s\n{res.logs[-6000:]}"


def _assert_sharded(s3, prefix: str, names: list[str]) -> None:
    """Every candidate in the bucket as a manifest and one part per rank, none empty."""
    objs = s3.list(prefix)
    for name in names:
        assert objs.get(f"{name}.arrow", 0) > 0, name
        parts = sorted(k for k in objs if k.startswith(f"{name}.parts/"))
        assert parts == [
            f"{name}.parts/part-{r:05d}-of-{WORKERS:05d}.arrow" for r in range(WORKERS)
        ], parts
        assert all(objs[k] > 0 for k in parts)


def test_fsdp_run_on_three_nodes_learns_the_ddp_alpha(cluster, s3, run_root):
    """The smoke run with --strategy fsdp, one rank per node, against the same run with DDP:
    sharded candidates in S3, the same candidates and alpha (rtol 1e-5), the outputs."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        seen: list[set[int]] = []
        prefix = f"{strategy}{WORKERS}"
        res = submit(
            cluster,
            [*RUN, "--strategy", strategy, "--storage", s3.uri(prefix)]
            + ["--out", str(run_root / prefix)],
            working_dir=REPO,
            on_poll=lambda seen=seen: seen.append(train_nodes(cluster)),
        )
        assert res.status == "SUCCEEDED", _explain(res)
        runs[strategy] = prefix
        assert max(map(len, seen)) == WORKERS, f"{strategy}: the workers ran on nodes {seen}"

    fsdp, ddp = (CandidateStore(s3.uri(f"{runs[s]}/candidates")) for s in ("fsdp", "ddp"))
    names = fsdp.names()
    assert names == ddp.names() and len(names) >= 2
    _assert_sharded(s3, f"{runs['fsdp']}/candidates", names)
    for name in names:  # the same training, reduced in another order (3 ranks)
        torch.testing.assert_close(fsdp.read(name), ddp.read(name), rtol=1e-5, atol=1e-6)

    got, want = coefficients(s3, runs["fsdp"]), coefficients(s3, runs["ddp"])
    assert set(want) == {"twa_v"} and got.keys() == want.keys()
    np.testing.assert_allclose(got["twa_v"], want["twa_v"], rtol=1e-5, atol=0)

    objs = s3.list(runs["fsdp"])
    assert objs.get("outputs/metrics.json", 0) > 0
    model = ("outputs/model.safetensors", "outputs/model.safetensors.index.json")
    assert any(objs.get(f, 0) > 0 for f in model), sorted(objs)
    metrics = json.loads((run_root / runs["fsdp"] / "metrics.json").read_text())
    assert metrics["coefficient_phase"]["basis_placement"] == "fsdp"


def test_ray_train_loop_learns_on_the_shards(cluster, s3, run_root):
    """A TorchTrainer loop of 3 ranks on 3 nodes: fully_shard, a sharded snapshot to S3 every 2
    steps, then twa_ray.train.learn on the shards: every rank's alpha is the unsharded learn's
    over the same store and the ranks' batches joined (rtol 1e-5); theta stays sharded."""
    store = s3.uri("loop/candidates")
    res = submit(
        cluster,
        ["python", "tests/cluster/fsdp_loop_job.py", "--store", store]
        + ["--storage", s3.uri("loop/ray"), "--out", str(run_root / "loop")]
        + ["--workers", str(WORKERS)],
        working_dir=REPO,
    )
    assert res.status == "SUCCEEDED", _explain(res)
    got = json.loads((run_root / "loop" / "result.json").read_text())
    assert len(set(got["nodes"])) == WORKERS, got["nodes"]  # one rank per node
    assert got["same_alpha"]

    names = CandidateStore(store).names()
    assert names == [f"step{s:08d}" for s in range(loop.EVERY, loop.STEPS + 1, loop.EVERY)]
    _assert_sharded(s3, "loop/candidates", names)

    model = loop.make_model()
    joined = [
        tuple(torch.cat(parts) for parts in zip(*step))
        for step in zip(*(loop.learn_batches(r) for r in range(WORKERS)))
    ]
    ref = twa_ray.train.learn(model, store, joined, **loop.LEARN)
    assert (ref.alpha - ref.placement.alpha0).abs().max() > 1e-3  # alpha moved
    torch.testing.assert_close(torch.tensor(got["alpha"]), ref.alpha, rtol=1e-5, atol=0)
    numel = Layout.from_module(model).numel
    assert sum(got["theta_numel"]) == numel and max(got["theta_numel"]) < numel

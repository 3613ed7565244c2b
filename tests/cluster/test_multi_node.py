"""``twa-ray`` on a head + 3 worker nodes that share nothing but an S3 server (see harness.py).

The run folders (``--out``) and Ray's temp dir of every worker node are private tmpfs mounts: a
file a worker writes there is invisible to the head and the other nodes, as on separate machines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import coefficients, submit, train_nodes

from twa_ray.store import CandidateStore

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# 10 sampled epochs (one candidate each, ~0.5 s each here) of the 20-epoch budget, 1 TWA epoch
RUN = ["python", "jobs/run_twa.py", "--smoke-test", "--epochs", "20", "--workers", "2"]
NUM_CANDIDATES = 10
LAST_CHECKPOINT = f"/checkpoint_epoch{NUM_CANDIDATES:04d}/"
# the run that loses two nodes: two failures tolerated, a checkpoint at every epoch / coefficient
# step, each of which then waits for Ray Train's next report poll (KILL_WINDOW: every 0.5 s, not
# the tests' 0.2 s): the sampling kill has 7 checkpoints (>= 3.5 s) to land in, the coefficient
# kill the 16 steps of TWA-v (>= 8 s)
KILLABLE = ["--max-failures", "2", "--checkpoint-interval", "0"]
KILL_WINDOW = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def _explain(res) -> str:
    return f"job {res.job_id}: {res.status} after {res.wall_s:.0f} s\n{res.logs[-6000:]}"


def _candidates(s3, prefix: str) -> dict[str, torch.Tensor]:
    store = CandidateStore(s3.uri(f"{prefix}/candidates"))
    return {n: store.read(n).clone() for n in store.names()}


def test_local_storage_is_refused_on_a_multi_node_cluster(cluster, run_root):
    """Item 3: exit 2 and one line, before any training; nothing written."""
    out = run_root / "refused"
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/run_twa.py",
            "--smoke-test",
            "--address",
            cluster.gcs_address,
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert err[-1].startswith("twa-ray: error: the Ray cluster has 4 nodes and --out"), err[-1]
    assert "--storage s3://" in err[-1] and "--shared-fs" in err[-1]
    assert "Traceback" not in proc.stderr
    assert not (out / "run.json").exists() and not (out / "candidates").exists()


def test_data_root_missing_on_the_worker_nodes_is_one_line(cluster, s3, run_root):
    """Item 2: the head has --data-root, the worker nodes do not (it lies in their hidden run
    folder): exit 2 before training, one line naming a node and the path; nothing stored."""
    root = run_root / "data"
    root.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/run_twa.py",
            "--smoke-test",
            "--dataset",
            "node_data:splits",
            "--data-root",
            str(root),
            "--address",
            cluster.gcs_address,
            "--storage",
            s3.uri("nodata"),
            "--out",
            str(run_root / "nodata"),
        ],
        cwd=REPO,
        env={**cluster.env, "PYTHONPATH": str(Path(__file__).parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last.startswith(f"twa-ray: error: --data-root {str(root)!r} does not exist on node "), (
        last
    )
    assert "Traceback" not in proc.stderr
    assert "run.json" not in s3.list("nodata")


@pytest.fixture(scope="module")
def run_a(cluster, s3, run_root):
    """The uninterrupted run on two nodes under prefix "a": the kill tests compare with it.
    Returns the job and the sets of nodes that ran Ray Train workers, one per poll."""
    seen: list[set[int]] = []
    res = submit(
        cluster,
        [*RUN, "--storage", s3.uri("a"), "--out", str(run_root / "a")],
        working_dir=REPO,
        on_poll=lambda: seen.append(train_nodes(cluster)),
    )
    return res, seen


def _uninterrupted(run_a, s3) -> dict[str, torch.Tensor]:
    res, _ = run_a
    assert res.status == "SUCCEEDED", "the uninterrupted run failed:\n" + _explain(res)
    return _candidates(s3, "a")


def test_smoke_job_on_two_nodes_with_s3_matches_one_node(cluster, s3, run_root, run_a):
    """Items 1, 5a: every artifact lands in the bucket; alpha equal a one-node run's."""
    res, seen = run_a
    assert res.status == "SUCCEEDED", _explain(res)
    assert max(map(len, seen)) == 2, f"the workers ran on nodes {seen}"

    objs = s3.list("a")
    names = sorted(objs)
    assert (
        sum(k.startswith("candidates/") and k.endswith(".arrow") for k in names) == NUM_CANDIDATES
    )
    # the sampling phase's model and EMAs: carried into every checkpoint of the one worker group
    assert any(k.startswith("work/ray_train/twa_") and k.endswith("/state.pt") for k in names)
    assert any(k.startswith("work/ray_train/twa_") and k.endswith("/result.pt") for k in names), (
        names
    )
    for f in (
        "run.json",
        "outputs/metrics.json",
        "outputs/model.safetensors",
        "outputs/coefficients.parquet",
        "outputs/config.yaml",
    ):
        assert objs.get(f, 0) > 0, f
    # the driver ran on the head: --out there holds the local copy of the outputs
    local = json.loads((run_root / "a" / "metrics.json").read_text())
    assert (
        local["run_id"]
        == json.loads(s3.fs().open_input_stream(f"{s3.bucket}/a/run.json").read())["run_id"]
    )

    # the same run with both workers on one node (0.5 CPU each: Ray packs them together)
    seen = []
    ref = submit(
        cluster,
        [
            *RUN,
            "--cpus-per-worker",
            "0.5",
            "--storage",
            s3.uri("one"),
            "--out",
            str(run_root / "one"),
        ],
        working_dir=REPO,
        on_poll=lambda: seen.append(train_nodes(cluster)),
    )
    assert ref.status == "SUCCEEDED", _explain(ref)
    assert max(map(len, seen)) == 1, f"the workers ran on nodes {seen}"
    a, one = coefficients(s3, "a"), coefficients(s3, "one")
    assert a.keys() == one.keys() == {"twa_t", "twa_v"}
    for k in a:
        torch.testing.assert_close(torch.tensor(a[k]), torch.tensor(one[k]), rtol=1e-5, atol=0)
    ca, cone = _candidates(s3, "a"), _candidates(s3, "one")
    assert ca.keys() == cone.keys()
    for n in ca:
        torch.testing.assert_close(ca[n], cone[n], rtol=1e-5, atol=1e-7)


def test_basis_one_copy_per_node_zero_copy_on_workers(cluster, tmp_path):
    """Item 5c: coefficient workers on two nodes, two per node: each node's object store holds
    one copy of B (per-node store stats from the raylets), and on every worker the basis
    tensors lie in the object store's mapping (zero-copy)."""
    import ray
    from ray._private.internal_api import node_stats

    from twa_ray.core.layout import Layout
    from twa_ray.core.twa import TWAConfig
    from twa_ray.ray.shards import put_subspace

    def used() -> dict[str, int]:
        out = {}
        for n in ray.nodes():
            name = next(
                (r for r in n["Resources"] if r.startswith("node") and r[4:].isdigit()), "head"
            )
            if n["Alive"]:
                st = node_stats(
                    n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False
                )
                out[name] = st.store_stats.object_store_bytes_used
        return out

    ray.init(address=cluster.gcs_address, log_to_driver=False)
    try:
        model = torch.nn.Linear(1024, 1024, bias=False)  # D = 2^20
        layout = Layout.from_module(model)
        store = CandidateStore(tmp_path / "c", create=True)
        for k in range(8):
            torch.nn.init.normal_(model.weight)
            store.write(model.state_dict(), layout, step=k + 1)
        sharded = put_subspace(store, layout, TWAConfig(bits=8))
        before = used()

        @ray.remote(num_cpus=0)
        class Worker:
            def __init__(self, sharded):
                self.view = sharded.materialize()

            def check(self):
                tensors = [pm.data for pm in self.view.basis.shards] + [self.view.origin]
                ranges = []  # this process's mappings of the object store (plasma's shared memory)
                for line in open("/proc/self/maps").read().splitlines():
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and (
                        "plasma" in parts[5] or parts[5].startswith("/dev/shm")
                    ):
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        ranges.append((lo, hi))
                inside = [any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in tensors]
                return ray.get_runtime_context().get_node_id(), inside

        workers = [
            Worker.options(resources={f"node{i}": 0.01}).remote(sharded) for i in (0, 0, 1, 1)
        ]
        checks = ray.get([w.check.remote() for w in workers])
        after = used()
        assert len({node for node, _ in checks}) == 2
        assert all(all(inside) for _, inside in checks), checks
        b = sharded.nbytes + layout.numel * 4  # B + the origin, float32
        for node in ("node0", "node1"):
            grew = after[node] - before[node]
            assert b <= grew < 1.5 * b, (node, grew, b)  # one copy, not one per worker
        assert after["node2"] - before["node2"] < 0.1 * b
        del workers
    finally:
        ray.shutdown()


def _span(s3, prefix: str) -> tuple[float, float]:
    """When a Ray Train run under ``prefix`` started (its storage marker, written as the run
    sets up) and wrote its last checkpoint (S3 LastModified, whole seconds)."""
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(f"{s3.bucket}/{prefix}", recursive=True)
    files = [i for i in s3.fs().get_file_info(sel) if i.type == pafs.FileType.File]
    start = min(i.mtime.timestamp() for i in files if i.base_name == ".validate_storage_marker")
    return start, max(i.mtime.timestamp() for i in files if "/checkpoint_epoch" in i.path)


SWEEP = {
    "data": {"num_samples": 1500},
    "sampling": {"epochs": 8, "sample_frac": 0.5, "batch_size": 64, "num_workers": 1},
    "twa": {"epochs": 3},
    "mode": "v",
    "sweep": {
        "scheduler": "none",
        "cpus_per_trial": 1,
        "space": {"sampling.lr": {"grid": [0.05, 0.1]}, "twa.lr": {"grid": [0.05, 0.2]}},
    },
}


def test_sweep_on_the_cluster_resumes_from_s3_after_its_driver_died(cluster, s3, run_root):
    """Item 5d: two sampling groups run at once (one worker each, 3 nodes free); the trials run
    on several nodes; the driver, SIGKILLed once a trial checkpointed to S3, is rerun with
    --resume on --storage alone (a new --out) and finishes the sweep."""
    import os
    import signal
    import time

    import yaml

    config = run_root / "sweep.yaml"
    config.write_text(yaml.safe_dump(SWEEP))
    cmd = [
        sys.executable,
        "-c",
        "import sys; from twa_ray.cli import main; sys.exit(main(sys.argv[1:]))",
        "sweep",
        "--config",
        str(config),
        "--address",
        cluster.gcs_address,
        "--storage",
        s3.uri("sw"),
    ]
    log = open(run_root / "sweep1.log", "w")
    first = subprocess.Popen(
        [*cmd, "--out", str(run_root / "sw1")],
        cwd=REPO,
        env=cluster.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    t0 = time.monotonic()
    while first.poll() is None and time.monotonic() - t0 < 600:
        if any("/checkpoint_" in k for k in s3.list("sw/tune/sweep")):
            os.killpg(first.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    first.wait(timeout=60)
    log.close()
    assert first.returncode == -signal.SIGKILL, (run_root / "sweep1.log").read_text()[-4000:]
    assert not s3.list("sw/outputs")
    done = [k for k in s3.list("sw/sampling") if k.endswith("/sampling_done.json")]
    assert len(done) == 2  # both groups sampled before any trial ran
    # the two sampling runs overlapped in time: each wrote a checkpoint before the other's last
    spans = [_span(s3, f"sw/sampling/{k.split('/')[0]}/ray_train") for k in done]
    assert spans[0][0] <= spans[1][1] and spans[1][0] <= spans[0][1], spans

    second = subprocess.run(
        [*cmd, "--resume", "--out", str(run_root / "sw2")],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((run_root / "sw2" / "summary.json").read_text())
    assert summary["counts"]["trials"] == 4 and summary["counts"]["completed"] == 4
    assert summary["counts"]["sampling_runs_this_call"] == 0  # the finished runs, from S3
    assert "outputs/summary.json" in s3.list("sw")
    import pandas as pd

    rows = pd.read_csv(run_root / "sw2" / "trials.csv")
    assert rows["node_id"].nunique() >= 2, rows["node_id"].tolist()
    assert (rows["val_acc"] > 0.3).all(), rows["val_acc"].tolist()  # 10 classes: chance is 0.1
    assert "sampling 2 groups, 2 at a time" in (run_root / "sweep1.log").read_text()


def _registered_checkpoint(s3, prefix: str, group: str) -> str | None:
    """The latest checkpoint that Ray Train has registered for the run ``group_*`` under
    ``prefix`` (its controller's snapshot in storage; an uploaded checkpoint is registered a
    poll later, and one that is not may be lost with a dead worker)."""
    snaps = [
        k
        for k in s3.list(f"{prefix}/work/ray_train")
        if k.startswith(f"{group}_") and k.endswith("/checkpoint_manager_snapshot.json")
    ]
    if not snaps:
        return None
    with s3.fs().open_input_stream(f"{s3.bucket}/{prefix}/work/ray_train/{snaps[0]}") as f:
        text = f.read()
    try:
        latest = json.loads(text).get("latest_checkpoint_result") or {}
    except ValueError:  # read while the controller rewrites it (a cut JSON, or its bytes cut
        return None  # inside a UTF-8 character): the next poll reads it
    return latest.get("checkpoint_dir_name")


def test_worker_nodes_killed_mid_sampling_then_mid_coefficient_phase_resume_from_s3(
    cluster, s3, run_root, run_a
):
    """Item 5b, one run that loses two worker nodes (every process of each, SIGKILL), with
    --max-failures 2:

    1. after the third sampling checkpoint, before the last: the group restarts on the other
       nodes from the checkpoint in S3 (a replacement node then joins: 3 again);
    2. once Ray Train has registered a coefficient checkpoint past TWA-t, before TWA-v ends:
       the group restarts on the other nodes from that checkpoint in S3, without sampling again.

    The store holds exactly the uninterrupted run's candidates, and alpha is its alpha (rtol
    1e-5)."""
    import re

    ca = _uninterrupted(run_a, s3)
    cluster.revive()  # 3 worker nodes: the run needs 2 after a kill
    killed: list[dict[str, object]] = []

    def kill_a_train_node(**when: object) -> bool:
        """SIGKILL a worker node that runs a Ray Train worker now; whether there was one."""
        i = min(train_nodes(cluster), default=None)
        if i is not None:
            killed.append(dict(node=i, pids=cluster.kill_node(i), **when))
        return i is not None

    def kill_mid_sampling_then_mid_twa_v() -> None:
        if not killed:
            written = s3.list("b/work/ray_train")
            third = any("/checkpoint_epoch0003/meta.json" in k for k in written)
            last = any(LAST_CHECKPOINT in k for k in written)
            if third and kill_a_train_node(mid_sampling=not last):
                cluster.revive()  # a replacement machine
        elif len(killed) == 1:
            name = _registered_checkpoint(s3, "b", "twa")
            if name is not None and re.fullmatch(r"checkpoint_v_step\d+", name):
                kill_a_train_node(registered=name)

    res = submit(
        cluster,
        [*RUN, *KILLABLE, "--storage", s3.uri("b"), "--out", str(run_root / "b")],
        working_dir=REPO,
        env_vars=KILL_WINDOW,
        on_poll=kill_mid_sampling_then_mid_twa_v,
    )
    assert len(killed) == 2, f"nodes killed: {killed}\n{_explain(res)}"
    assert killed[0]["mid_sampling"], f"the first kill came after sampling: {killed}"
    assert res.status == "SUCCEEDED", _explain(res)
    # 1: sampling went on from its checkpoint; 2: past TWA-t, and sampling did not run again
    assert res.logs.count("sampling: resumed at epoch") == 1, _explain(res)
    resumed = re.findall(
        r"twa: resumed at (mode v step \d+|a mode boundary) \(done: \['t'\]\)", res.logs
    )
    assert resumed, f"killed after {killed[1]['registered']}, no resume past TWA-t:\n" + (
        _explain(res)
    )
    a, b = coefficients(s3, "a"), coefficients(s3, "b")
    assert a.keys() == b.keys() == {"twa_t", "twa_v"}
    for k in a:
        torch.testing.assert_close(torch.tensor(b[k]), torch.tensor(a[k]), rtol=1e-5, atol=0)
    cb = _candidates(s3, "b")
    assert len(cb) == NUM_CANDIDATES and cb.keys() == ca.keys()
    for n in cb:
        assert torch.equal(cb[n], ca[n]), n

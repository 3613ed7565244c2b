"""Storage faults lose nothing, and every wait is bounded: writes to a real S3 server (moto's,
on 127.0.0.1) through a proxy that resets or stalls uploads mid-transfer; Ray and S3 endpoints
that do not answer. Timeouts are a few seconds here (``TWA_RAY_CONNECT_TIMEOUT``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twa_ray.cli import main
from twa_ray.connect import IDLE_WORKER_MS
from twa_ray.core.layout import Layout
from twa_ray.storage import open_storage, storage_fault
from twa_ray.store import CandidateStore

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from s3_faults import FaultProxy, bucket_objects, free_port, moto_s3
except ImportError:  # tests/ became a package
    from tests.s3_faults import FaultProxy, bucket_objects, free_port, moto_s3

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
    monkeypatch.setenv("TWA_RAY_CONNECT_TIMEOUT", "3")


def _model():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    return model, Layout.from_module(model)


def test_uploads_survive_reset_and_stalled_connections(s3):
    """Two uploads reset mid-transfer and one stalled: every candidate, record and output file
    lands whole, exactly once, with the bytes written."""
    model, layout = _model()
    with FaultProxy(s3, drop=2, stall=1) as proxy:
        uri = f"s3://bkt/faults/ok?endpoint_override={proxy.endpoint}&scheme=http"
        store = CandidateStore(f"{uri.replace('/ok?', '/ok/candidates?')}", create=True)
        names = [store.write(model.state_dict(), layout, step=i) for i in range(3)]
        st = open_storage(uri)
        st.write_json("run.json", {"run_id": "r", "pad": "x" * 8192})
        assert (proxy.dropped, proxy.stalled) == (2, 1)
    store = CandidateStore(
        f"s3://bkt/faults/ok/candidates?endpoint_override={s3}&scheme=http"
    )  # no proxy
    assert sorted(store.names()) == names
    for n in names:
        assert torch.equal(
            store.read(n), torch.cat([p.detach().flatten() for p in model.parameters()])
        )
    objects = bucket_objects(s3)
    assert sorted(k for k in objects if k.startswith("bkt/faults/ok/")) == sorted(
        [f"bkt/faults/ok/candidates/{n}.arrow" for n in names] + ["bkt/faults/ok/run.json"]
    )


def test_a_write_that_keeps_failing_leaves_nothing_and_one_line(s3):
    """Every upload reset: the write fails after the retries with an error that the CLI turns
    into one line, and the store holds no partial candidate."""
    model, layout = _model()
    with FaultProxy(s3, drop=1000) as proxy:
        store = CandidateStore(
            f"s3://bkt/faults/bad?endpoint_override={proxy.endpoint}&scheme=http", create=True
        )
        with pytest.raises(OSError) as err:
            store.write(model.state_dict(), layout, step=1)
        assert proxy.dropped >= 5  # retried, then given up
    line = storage_fault(err.value)
    assert line is not None and "rerun with --resume" in line and "\n" not in line
    assert not [k for k in bucket_objects(s3) if k.startswith("bkt/faults/bad/")]


def test_bad_connect_timeout_is_one_line(capsys, tmp_path):
    assert (
        main(["run", "--smoke-test", "--connect-timeout", "-1", "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("twa-ray: error: --connect-timeout") and "positive number of seconds" in err
    )


@pytest.mark.ray
def test_address_that_does_not_answer_fails_fast(capsys, tmp_path):
    """--address at a closed port: one line naming the address and the fix, before Ray waits."""
    port = free_port()
    argv = ["run", "--smoke-test", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"--address 127.0.0.1:{port}: no Ray head answered there within 3 s" in err[0]
    ), err
    assert not (tmp_path / "o" / "run.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_stale_local_ray_record_starts_a_fresh_ray():
    """Ray's record of a local head that has died (as a killed `ray start --head` leaves it):
    instead of waiting on it without end, a fresh local Ray starts, with one line saying so."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="twa-rt-", dir="/tmp"))  # Ray's socket paths must be short
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    env = {
        **os.environ,
        "RAY_TMPDIR": str(tmp),
        "PYTHONPATH": str(ROOT),
        "TWA_RAY_CONNECT_TIMEOUT": "3",
    }
    env.pop("RAY_ADDRESS", None)
    code = (
        "import os, ray; from twa_ray.connect import connect_ray; connect_ray(); "
        "print('CPUs', ray.cluster_resources()['CPU']); "
        "idle = ray.remote(lambda: os.environ.get('RAY_idle_worker_killing_time_threshold_ms')); "
        "print('idle', ray.get(idle.remote())); ray.shutdown()"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPUs" in proc.stdout
    # the fresh local Ray has twa-ray's defaults: its workers keep idle processes 60 s
    assert f"idle {IDLE_WORKER_MS}" in proc.stdout, proc.stdout
    assert (
        "does not answer" in proc.stderr and "starting a fresh local Ray instead" in proc.stderr
    ), proc.stderr[-3000:]


def test_answers_tries_the_port():
    """A listening port answers, a closed one does not; an address without a port is not tried."""
    from twa_ray.connect import answers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert answers(f"127.0.0.1:{s.getsockname()[1]}", 2)
    assert not answers(f"127.0.0.1:{free_port()}", 2)
    assert answers("auto", 2)  # no port: nothing to try

"""Crashes while writing outputs: a writer process SIGKILLed mid-write of ``model.safetensors`` or
``coefficients.parquet`` never leaves a file under the final name that loads but holds partial
data; a full disk (a file-size limit, ``RLIMIT_FSIZE``) is one clear CLI error and changes no
stored data."""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from twa_ray.cli import main
from twa_ray.core.layout import Layout, flatten
from twa_ray.report import write_coefficients, write_model
from twa_ray.store import CandidateStore

K, L = 200, 100  # 20,000 coefficient rows
FINAL = {"model": "model.safetensors", "coefficients": "coefficients.parquet"}


def _model(step: int) -> torch.nn.Module:
    m = torch.nn.Linear(2_000, 1_000)  # 2M parameters, 8 MB
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float(step))
    return m


def _write_forever(out: Path, what: str) -> None:
    """Child process body: rewrite one output, each version holding its step, until killed."""
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    labels = [f"b{i}" for i in range(L)]
    for step in range(1, 100_000):
        if what == "model":
            write_model(out / FINAL[what], _model(step), {"step": str(step)})
        else:
            alpha = torch.full((K, L), float(step))
            write_coefficients(out / FINAL[what], {"twa_v": alpha}, block_labels=labels)


def _check_complete(path: Path, what: str) -> int:
    """The step of the complete version at ``path`` (fails on a partial or mixed file)."""
    if what == "model":
        state = load_file(path)
        step = float(state["bias"][0])
        assert all(torch.all(t == step) for t in state.values())
        assert state["weight"].shape == (1_000, 2_000)
    else:
        table = pq.read_table(path)
        assert table.num_rows == K * L
        values = set(table.column("alpha").to_pylist())
        assert len(values) == 1
        step = values.pop()
    return int(step)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("what", ["model", "coefficients"])
def test_writer_killed_mid_write_leaves_the_last_complete_file(tmp_path, what):
    out = tmp_path / "out"
    out.mkdir()
    final = out / FINAL[what]
    pid = os.fork()  # fork, not a fresh interpreter: importing torch again costs seconds
    if pid == 0:
        code = 1
        try:
            _write_forever(out, what)
            code = 0
        finally:
            os._exit(code)
    temp = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and not temp:
            names = os.listdir(out)
            if final.name in names and any(n.endswith(".tmp") for n in names):
                # freeze the writer, and kill it only if it is still mid-write (a temp file exists)
                os.kill(pid, signal.SIGSTOP)
                temp = any(n.endswith(".tmp") for n in os.listdir(out))
                if not temp:
                    os.kill(pid, signal.SIGCONT)
            time.sleep(0.0005)
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert temp, "the writer was never caught mid-write"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert leftovers and all(n.startswith(f".{final.name}.") for n in leftovers)
    assert _check_complete(final, what) >= 1  # the final name holds a complete earlier version


def _with_file_size_limit(fn, limit: int = 64 << 10) -> tuple[int, str]:
    """Run ``fn`` in a forked child whose files cannot grow past ``limit`` bytes (a full disk);
    returns its exit code (``fn``'s return value, 3 if it raised) and its stderr."""
    read, write = os.pipe()
    pid = os.fork()  # fork, not a fresh interpreter: importing torch again costs seconds
    if pid == 0:
        code = 3
        try:
            torch.set_num_threads(1)
            os.close(read)
            sys.stderr = os.fdopen(write, "w")
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            code = fn()
        except BaseException as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status), err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_out_of_disk_is_one_clear_error_and_changes_nothing(tmp_path):
    """``twa-ray import`` under a 64 KiB file-size limit (as on a full disk: EFBIG, like
    ENOSPC): exit 2, one line naming the problem and the fix, the store is unchanged."""
    layout = Layout(("w", "b"), ((100, 200), (100,)), ("float32", "float32"))  # 80 KB a candidate
    store = CandidateStore(tmp_path / "store", create=True)
    store.write(torch.zeros(layout.numel), layout, step=0, name="existing")
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    src = tmp_path / "ckpts"
    src.mkdir()
    for i in range(2):
        torch.save({"w": torch.full((100, 200), float(i)), "b": torch.zeros(100)}, src / f"c{i}.pt")
    code, err = _with_file_size_limit(
        lambda: main(["import", str(src), "--out", str(tmp_path / "store")])
    )
    assert code == 2, err
    assert err.startswith("twa-ray: error: out of disk space") and err.count("\n") == 1, err
    assert "EFBIG" in err and "free space" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before
    assert flatten({"w": torch.zeros(100, 200), "b": torch.zeros(100)}, layout).equal(
        store.read("existing")
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("what", ["model", "coefficients"])
def test_out_of_disk_while_writing_outputs_keeps_the_old_file(tmp_path, what):
    """A full disk while replacing an output: OSError(EFBIG), the old file intact, no temp left."""
    final = tmp_path / FINAL[what]
    labels = [f"b{i}" for i in range(L)]
    if what == "model":
        write_model(final, torch.nn.Linear(4, 2), {"step": "0"})
    else:
        write_coefficients(final, {"twa_v": torch.zeros(2, L)}, block_labels=labels)
    before = final.read_bytes()

    def write_big() -> int:
        try:
            if what == "model":
                write_model(final, _model(1), {"step": "1"})
            else:
                write_coefficients(
                    final, {"twa_v": torch.randn(100, L)}, block_labels=labels
                )  # > 64 KiB
        except OSError as e:
            print(f"errno {e.errno}", file=sys.stderr)
            return 0
        return 1

    code, err = _with_file_size_limit(write_big)
    assert code == 0 and err.strip() == "errno 27", err  # EFBIG, as an OSError (CLI: exit 2)
    assert final.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [final.name]  # the temp file was removed

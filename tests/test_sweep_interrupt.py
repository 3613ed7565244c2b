"""Ctrl-C during a sweep, then ``--resume``: as a user would, in subprocesses (each starts its own
local Ray with the dashboard, as a sweep needs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import yaml
from helpers import cli_argv, cli_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ctrl_c_during_a_sweep_then_resume_finishes(tmp_path):
    """SIGINT while the sweep's sampling run trains: exit 130 with one line; the same command
    with --resume finishes the sampling run and the (one) trial."""
    config = tmp_path / "sweep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mode": "v",
                "sweep": {
                    "scheduler": "none",
                    "max_concurrent": 1,
                    "space": {"twa.lr": {"grid": [0.1]}},
                },
            }
        )
    )
    out = tmp_path / "out"
    argv = cli_argv("sweep", "--smoke-test", "--config", str(config), "--out", str(out))
    env = cli_env()  # the command sets a local Ray's defaults itself (connect.local_ray_defaults)
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "sampling epoch 2/" in line:
                break
        assert "sampling epoch 2/" in "".join(seen), "".join(seen)[-3000:]
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 130, rest[-3000:]
        assert rest.strip().splitlines()[-1] == "twa-ray: interrupted; rerun with --resume"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes of that session, if any are left
        except ProcessLookupError:
            pass
    assert not (out / "summary.json").exists()
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["trials"] == 1 and summary["counts"]["sampling_runs_this_call"] == 1

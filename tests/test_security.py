"""Security: no pickle of untrusted data (every torch.load passes weights_only=True), and no
credential from a storage URI or the environment in any file, object or console line."""

import json
import os
import re
from pathlib import Path

import pytest

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from s3_faults import FaultProxy, bucket_objects, moto_s3
except ImportError:  # tests/ became a package
    from tests.s3_faults import FaultProxy, bucket_objects, moto_s3

ROOT = Path(__file__).resolve().parents[1]


def test_torch_load_only_with_weights_only():
    offenders = []
    for folder in ("twa_ray", "jobs", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if (
                    re.search(r"torch\.load\(", line)
                    and "weights_only=True" not in line
                    and path.name != "test_security.py"
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


def test_no_plain_pickle_load():
    for path in (ROOT / "twa_ray").rglob("*.py"):
        text = path.read_text()
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path


# --------------------------------------------------------------------------- credentials

AKID, SECRET = "AKIDLEAKTEST0001", "s3cretLEAKvalue0002"


@pytest.mark.ray
@pytest.mark.slow
def test_no_credential_leaves_the_command_line(tmp_path):
    """A smoke run whose --storage carries credentials in its URI, through a proxy that resets
    two uploads mid-transfer: it finishes, every stored candidate whole, and neither the key id nor
    the secret is in any local output, any object of the bucket (checkpoints, configs, metrics)
    or the console; the console shows the URI redacted."""
    from helpers import run_cli

    from twa_ray.store import CandidateStore

    with moto_s3() as endpoint, FaultProxy(endpoint, drop=2, after=64 << 10) as proxy:
        query = f"endpoint_override={proxy.endpoint}&scheme=http"
        proc = run_cli(
            [
                *("run", "--smoke-test", "--mode", "t", "--out", str(tmp_path / "out")),
                *("--storage", f"s3://{AKID}:{SECRET}@bkt/runs/sec?{query}"),
            ],
            cwd=tmp_path,
        )
        console = proc.stdout + proc.stderr
        assert proc.returncode == 0, console[-3000:]
        assert proxy.dropped == 2  # the faults happened, and were retried
        objects = bucket_objects(endpoint)
        metrics = json.loads(objects["bkt/runs/sec/outputs/metrics.json"])
        store = CandidateStore(
            f"s3://bkt/runs/sec/candidates?endpoint_override={endpoint}&scheme=http"
        )
        mine = [n for n in store.names() if store.info(n).run_id == metrics["run_id"]]
        assert len(mine) == metrics["num_candidates"] and all(store.read(n).numel() for n in mine)
    assert f"and in s3://***@bkt/runs/sec/outputs?{query}" in console
    files = {str(p): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert "config.yaml" in " ".join(files) and any("meta.json" in k for k in objects)
    for where, blobs in (
        ("local outputs", files),
        ("bucket", objects),
        ("console", {"console": console.encode()}),
    ):
        for name, data in blobs.items():
            for secret in (AKID, SECRET):
                assert secret.encode() not in data, f"{secret} in {where}: {name}"


def test_redact_masks_user_info_secret_options_and_credential_variables(monkeypatch):
    from twa_ray.redact import redact

    monkeypatch.setenv("AWS_SESSION_TOKEN", "envTOKENvalue0099")
    uri = "s3://AK:SK@bkt/p?endpoint_override=h:1&secret_key=SK&scheme=http"
    assert redact(uri) == "s3://***@bkt/p?endpoint_override=h:1&secret_key=***&scheme=http"
    assert redact(f"failed: {uri!r}; token envTOKENvalue0099") == (
        "failed: 's3://***@bkt/p?endpoint_override=h:1&secret_key=***&scheme=http'; token ***"
    )
    assert redact({"a": [uri, 1.5, None], "n": 3}) == {"a": [redact(uri), 1.5, None], "n": 3}
    plain = "s3://bkt/p?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redact(plain) == plain  # nothing to mask: left as it is


def test_saved_records_are_masked_and_read_back_with_the_credentials_given(tmp_path):
    """A record holding a credential-bearing URI is saved masked; read back, the URI takes the
    credentials given for that bucket on this command line, else none (the environment's)."""
    from twa_ray import redact
    from twa_ray.storage import open_storage

    uri = "s3://AKIDSAVED0001:savedSECRET0002@bkt9/runs/a?endpoint_override=h:1&scheme=http"
    st = open_storage(tmp_path / "st")
    st.write_json("plan.json", {"run_dir": uri})
    raw = (tmp_path / "st" / "plan.json").read_text()
    assert (
        "savedSECRET0002" not in raw
        and "AKIDSAVED0001" not in raw
        and "s3://***@bkt9/runs/a" in raw
    )
    assert (
        st.read_json("plan.json")["run_dir"] == "s3://bkt9/runs/a?endpoint_override=h:1&scheme=http"
    )
    redact.remember(
        uri.replace("/runs/a", "/other")
    )  # --storage of the same bucket on this command line
    try:
        assert st.read_json("plan.json")["run_dir"] == uri
    finally:
        redact._KNOWN.clear()


def test_console_stream_masks_what_is_printed(capsys):
    from twa_ray.redact import RedactingStream

    stream = RedactingStream(__import__("sys").stdout)
    print("outputs in s3://AK:consoleSECRET1@bkt/p", file=stream)
    assert capsys.readouterr().out == "outputs in s3://***@bkt/p\n"


def test_log_records_are_masked_once_installed(caplog):
    """``redact.install()`` (a command's start) masks every log record; twice wraps once."""
    import logging

    from twa_ray import redact

    before = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)  # as in a fresh process
    try:
        redact.install()
        installed = logging.getLogRecordFactory()
        redact.install()
        assert logging.getLogRecordFactory() is installed is not logging.LogRecord
        with caplog.at_level(logging.INFO, logger="twa_ray.any"):
            logging.getLogger("twa_ray.any").info(
                "reusing the run in %s", "s3://AK:logSECRET0001@bkt/p"
            )
    finally:
        logging.setLogRecordFactory(before)
    assert caplog.messages == ["reusing the run in s3://***@bkt/p"]


def test_a_command_installs_the_masking(tmp_path, capsys):
    """``twa-ray`` masks log records from its start: even a command refused at once."""
    import logging

    from twa_ray.cli import main

    before = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    try:
        assert main(["average", "--store", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
        assert getattr(logging.getLogRecordFactory(), "_twa_ray", False)
    finally:
        logging.setLogRecordFactory(before)
    assert "none" in capsys.readouterr().err


def test_importing_the_package_leaves_logging_alone():
    """No side effect on import: the masking factory arrives only with a command's start."""
    import subprocess
    import sys

    code = (
        "import logging, twa_ray.redact, twa_ray.cli, twa_ray.store, twa_ray.ray.group; "
        "print(logging.getLogRecordFactory() is logging.LogRecord)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_a_reused_config_takes_the_credentials_again(tmp_path):
    """``config.yaml`` holds the store masked; reused, the store takes the credentials of the
    --storage given again on the command line (same bucket), else the environment's."""
    from twa_ray import redact
    from twa_ray.storage import absolute, open_storage

    storage = (
        "s3://AKIDREUSE0001:reuseSECRET0002@bkt8/runs/a?endpoint_override=127.0.0.1:9&scheme=http"
    )
    store = storage.replace("/runs/a?", "/runs/a/candidates?")
    saved = redact.redact(store)  # what config.yaml holds
    assert "reuseSECRET0002" not in saved
    assert (
        absolute(saved) == "s3://bkt8/runs/a/candidates?endpoint_override=127.0.0.1:9&scheme=http"
    )
    try:
        open_storage(storage, create=False)  # --storage with the credentials, on this command line
        assert absolute(saved) == store
    finally:
        redact._KNOWN.clear()

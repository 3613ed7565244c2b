"""The documented integration snippets run as written (copied into a file, run with python),
wherever they live: README.md or docs/*.md (tests/docs_pages.py finds them by section)."""

import os
import subprocess
import sys

import pytest

from tests.docs_pages import ROOT, one_block


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "section,needs",
    [
        ("Lightning", "lightning"),
        ("Hugging Face Trainer", "transformers"),
        ("Hugging Face model folders", "transformers"),
    ],
    ids=["lightning", "hf-trainer", "hf-folders"],
)
def test_snippet_runs_as_written(section, needs, tmp_path):
    pytest.importorskip(needs)
    r = _run(one_block(section), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "twa/twa_acc" in r.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_loop_snippet_runs_as_written(tmp_path):
    """The "Any Ray Train loop" example: a TorchTrainer of 2 workers snapshots 4 candidates,
    then ``learn`` fits one coefficient per candidate (its own local Ray, in the subprocess)."""
    r = _run(one_block("Any Ray Train loop"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 candidates, alpha [" in r.stdout, r.stdout[-2000:]

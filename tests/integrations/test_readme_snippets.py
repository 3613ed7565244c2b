"""The README's integration snippets run as written (copied into a file, run with python)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTION = (
    (ROOT / "README.md")
    .read_text()
    .split("## Lightning, Hugging Face and Ray Train", 1)[1]
    .split("\n## ", 1)[0]
)
SNIPPETS = re.findall(r"```python\n(.*?)```", SECTION, re.S)


@pytest.mark.slow
@pytest.mark.parametrize(
    "index,needs",
    [(0, "lightning"), (1, "transformers"), (2, "transformers")],
    ids=["lightning", "hf-trainer", "hf-folders"],
)
def test_snippet_runs_as_written(index, needs, tmp_path):
    pytest.importorskip(needs)
    script = tmp_path / "snippet.py"
    script.write_text(SNIPPETS[index])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "twa/twa_acc" in r.stdout

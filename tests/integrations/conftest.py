"""Shared runs of the integration examples (each is a script run as a user runs it)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray.conftest import ray_cluster  # noqa: F401  (one local Ray per module)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(script: str, out: Path, *args: str) -> dict:
    """Run ``examples/<script> --out OUT ARGS`` in a fresh interpreter; its result.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def load_example(script: str):
    """An example as a module that is not in sys.modules (so Ray pickles its functions by value)."""
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LIGHTNING_ARGS = ("--n-train", "1024")


@pytest.fixture(scope="session")
def lightning_single(tmp_path_factory):
    """examples/lightning_single.py on one process, 32 examples per batch: (out, result)."""
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("lightning_single")
    return out, run_example("lightning_single.py", out, *LIGHTNING_ARGS, "--batch-size", "32")


@pytest.fixture(scope="session")
def hf_single(tmp_path_factory):
    """examples/hf_trainer.py in this process's interpreter, 32 examples per batch: (out, result)."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf_single")
    return out, run_example("hf_trainer.py", out)

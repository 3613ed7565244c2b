"""twa_ray without the extras: importing works, a callback or --model hf: is one clear error."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HIDE = "import sys; sys.modules.update({m: None for m in ('lightning', 'lightning.pytorch', 'transformers')})\n"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", HIDE + code],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_missing_extra_is_one_clear_error(tmp_path):
    code = """
import twa_ray, twa_ray.integrations, twa_ray.store.hf   # no extra needed
for name, extra in (("lightning", "lightning"), ("hf", "hf")):
    try:
        __import__(f"twa_ray.integrations.{name}")
    except ImportError as e:
        assert str(e).endswith(f"pip install 'twa_ray[{extra}]'"), e
    else:
        raise AssertionError(name)
from twa_ray.cli import main
import os; os.mkdir("s")
sys.exit(main(["average", "--store", "s", "--model", "hf:.", "--dataset",
               "tests.integrations.tiny_hf:images", "--out", "o"]))
"""
    r = _python(code, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "twa-ray: error: --model hf:.: transformers is not installed; install the extra: pip install 'twa_ray[hf]'"
    ], r.stderr
    assert not (tmp_path / "o").exists()

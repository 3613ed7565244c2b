"""The core must stay pure torch: importing it must not import Ray."""

import subprocess
import sys
from pathlib import Path


def test_core_never_imports_ray():
    code = "import sys, twa_ray.core; sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_no_ray_import_statement_in_core():
    core = Path(__file__).resolve().parents[2] / "twa_ray" / "core"
    for path in core.rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.strip().startswith(("import ray", "from ray")), f"{path}: {line}"

"""No pickle of untrusted data: every torch.load in the project passes weights_only=True."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torch_load_only_with_weights_only():
    offenders = []
    for folder in ("twa_ray", "jobs", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"torch\.load\(", line) and "weights_only=True" not in line and path.name != "test_security.py":
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


def test_no_plain_pickle_load():
    for path in (ROOT / "twa_ray").rglob("*.py"):
        text = path.read_text()
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path

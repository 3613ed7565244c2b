"""The README's commands and library example stay true."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_library_example_runs():
    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["twa"].step_count == 40


def test_first_lines_give_the_two_commands():
    head = README.split("```bash", 1)[1].split("```", 1)[0]
    assert 'pip install -e ".[dev]"' in head and "twa-ray run" in head
    assert "python -m pytest" in head
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[dev]"' in ci and "python -m pytest" in ci

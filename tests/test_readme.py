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


def test_bad_input_table_names_tests_that_exist():
    """Every row of the README's bad-input table names the tests that cover it, and each one
    exists (file, test function, parametrize id): the table cannot rot."""
    import ast

    root = Path(__file__).resolve().parents[1]
    section = README.split("## Failures and bad inputs", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| case ")]
    assert len(rows) >= 20
    functions: dict[str, tuple[set[str], str]] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
        assert len(cells) == 4 and all(cells), row
        refs = re.findall(r"`([^`]+)`", cells[3])
        assert refs, f"no test named in: {row}"
        path = func = None
        for ref in refs:
            m = re.fullmatch(r"(?:(tests/[\w/]+\.py)::(test_\w+))?(?:\[([\w-]+)\])?", ref)
            assert m and (m.group(1) or path), f"bad test reference {ref!r} in: {row}"
            if m.group(1):
                path, func = m.group(1), m.group(2)
            if path not in functions:
                source = (root / path).read_text()
                names = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
                functions[path] = (names, source)
            names, source = functions[path]
            assert func in names, f"{path}::{func} does not exist ({row})"
            if m.group(3):
                assert f'id="{m.group(3)}"' in source, f"{path}: no parametrize id {m.group(3)!r} ({row})"


def test_security_section_says_how_to_submit_with_token_auth():
    for phrase in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "ray dashboard cluster.yaml", "127.0.0.1",
                   "Never bind the dashboard to 0.0.0.0", "weights_only=True"):
        assert phrase in README, phrase


def test_docs_cite_only_files_in_the_repository():
    """Code and docs cite bench/RESULTS.md, the paper or the code, never a file kept elsewhere."""
    root = Path(__file__).resolve().parents[1]
    absent = "BENCH" + "MARKS.md"  # split: this file must not match itself
    files = [root / "README.md", *root.glob("*.toml")]
    for folder in ("twa_ray", "tests", "bench", "jobs", "configs", "docs"):
        files += [p for p in (root / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".toml", ".txt")]
    citing = [str(p.relative_to(root)) for p in files if p.is_file() and absent in p.read_text(errors="ignore")]
    assert not citing, citing

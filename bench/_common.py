"""What the benchmarks share: the checkout on ``sys.path``, the CPU's name, the ``twa-ray``
command line, Markdown tables and JSON results.

A script of ``bench/`` imports it as ``from _common import ...`` (``python bench/X.py`` puts
``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's twa_ray, installed or not
    sys.path.insert(0, str(ROOT))

from twa_ray.core.kernels.cpu import cpu_model  # noqa: E402

__all__ = [
    "ROOT",
    "cpu_model",
    "free_port",
    "markdown_table",
    "report",
    "twa_ray_cli",
    "write_json",
]


def twa_ray_cli(*argv: str) -> list[str]:
    """``twa-ray ARGV`` as this interpreter runs it (no console script needed)."""
    return [sys.executable, "-m", "twa_ray.cli", *argv]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, then one line a row (cells as
    ``str`` gives them; a row may have fewer cells than the header)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def report(
    title: str,
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    result: Any,
    json_path: Path | None,
) -> None:
    """Print ``title`` and the Markdown table; write ``result`` to ``json_path`` (None: a smoke
    run, no file)."""
    print(title)
    print("\n".join(markdown_table(header, rows)))
    if json_path is not None:
        write_json(json_path, result)
        print(f"wrote {json_path}")


def write_json(path: str | Path, result: Any, *, indent: int = 2) -> None:
    """``result`` as indented JSON with a final newline (values JSON cannot hold as ``str``)."""
    Path(path).write_text(json.dumps(result, indent=indent, default=str) + "\n")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo ``tcp://`` init of spawned processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

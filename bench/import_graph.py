"""The import graph of ``twa_ray/``: its longest chain and its circles (issue 27 item 1).

    python bench/import_graph.py [ROOT]     # ROOT: a checkout (default: this one)

Every ``import`` / ``from ... import`` of a ``twa_ray`` module counts, at the top of a module or
inside a function (a lazy import is still a dependency), except under ``if TYPE_CHECKING:``.
``from twa_ray.x import y`` is an edge to ``twa_ray.x.y`` when that is a module, else to
``twa_ray.x``. A circle is a strongly connected component of more than one module; the depth
is the number of modules on the longest chain of the graph with each circle counted as one.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` below ``root/twa_ray``."""
    out = {}
    for f in sorted((root / "twa_ray").rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The twa_ray modules ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def longest_chain(g: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports, a circle counted as one module (its first name)."""
    comp = {m: c[0] for c in circles(g) for m in c}
    dag: dict[str, set[str]] = {}
    for v, ws in g.items():
        dag.setdefault(comp.get(v, v), set()).update(comp.get(w, w) for w in ws)
    for v in dag:
        dag[v].discard(v)

    @cache
    def chain(v: str) -> tuple[str, ...]:
        return (v, *max((chain(w) for w in sorted(dag[v])), key=len, default=()))

    return list(max((chain(v) for v in sorted(dag)), key=len))


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    g = graph(root)
    loops = circles(g)
    chain = longest_chain(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports")
    print(f"longest chain: {len(chain)} modules: {' -> '.join(chain)}")
    print(f"circles: {len(loops)}")
    for c in loops:
        print("  " + ", ".join(c))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The user documentation as the tests read it: README.md, then docs/*.md, cut into sections and
fenced blocks, so a block stays tested wherever it moves between the pages."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]
HEADING = re.compile(r"^(#{1,3}) (.+)$", re.M)
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def text(page: str) -> str:
    return (ROOT / page).read_text()


def headings(page: str) -> list[str]:
    """The page's ``#``/``##``/``###`` titles, fenced blocks left out (their ``# comments``)."""
    return [m.group(2).strip() for m in HEADING.finditer(FENCE.sub("", text(page)))]


def sections(page: str) -> list[tuple[str, str]]:
    """``(title, text)`` of the page's ``## `` / ``### `` sections, in order; what comes before
    the first is titled ``top``. Split outside fenced blocks only."""
    out, title, start = [], "top", 0
    src = text(page)
    fences = [m.span() for m in FENCE.finditer(src)]
    for m in re.finditer(r"^#{2,3} (.+)$", src, re.M):
        if any(a < m.start() < b for a, b in fences):
            continue
        out.append((title, src[start : m.start()]))
        title, start = m.group(1).strip(), m.start()
    out.append((title, src[start:]))
    return out


def blocks_titled(title: str, kind: str) -> list[str]:
    """The ``kind`` blocks of every section titled ``title``, on any page."""
    return [
        code
        for page in PAGES
        for t, body in sections(page)
        if t == title
        for k, code in FENCE.findall(body)
        if k == kind
    ]


def one_block(title: str, kind: str = "python") -> str:
    """The one ``kind`` block under the section ``title`` (whichever page holds it)."""
    found = blocks_titled(title, kind)
    assert len(found) == 1, f"{len(found)} {kind} blocks under a section {title!r}, expected one"
    return found[0]


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")

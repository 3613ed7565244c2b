"""Atomic writes: a file (or folder) appears under its name whole, or not at all.

``with atomic_path(target) as tmp:`` yields a fresh hidden name next to ``target``
(``.<name>.<uuid>.tmp``: the same directory, so the rename never crosses a filesystem). The body
creates ``tmp``; on success it is flushed to disk (``fsync``) and renamed onto ``target``
(:func:`publish`), on any failure removed. Readers see the old file or the whole new one, and
concurrent writers (Ray workers filling one cache) just race to rename. The file gets the mode
any new file gets (:func:`file_mode`: ``0o666`` minus the umask, 0644 under umask 022), whatever
its writer chose (``safetensors`` writes 0600).

The one implementation for every layer (outputs, run records, the dataset and kernel caches, the
candidate store, Hugging Face folders); pure Python, so the core's kernel cache uses it too.
Object stores (``pyarrow.fs`` URIs) need none: one PUT is atomic already.

>>> import pathlib, tempfile
>>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
>>> with atomic_path(target) as tmp:
...     _ = pathlib.Path(tmp).write_text("whole")
>>> target.read_text()
'whole'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "file_mode", "publish"]

_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path next to ``target`` for the body to create (a file, or a folder);
    on success it replaces ``target`` (a folder replaces a folder), on failure it is removed."""
    target = Path(target)
    tmp = str(target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp"))
    try:
        yield tmp
        _finish(tmp)
        publish(tmp, target)
    finally:
        _remove(tmp)


def publish(
    tmp: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool = True
) -> None:
    """Rename the finished ``tmp`` onto ``target`` in one step (``os.replace``).

    ``overwrite=False`` renames only if ``target`` does not exist (``FileExistsError``
    otherwise): a hard link, the atomic create-if-absent, then ``tmp`` removed; on a filesystem
    without hard links, a check then the rename."""
    if not overwrite:
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem
            if os.path.exists(target):
                raise FileExistsError(f"{target} exists") from None
            os.replace(tmp, target)
        else:
            os.unlink(tmp)
        return
    if os.path.isdir(tmp) and os.path.isdir(target):
        shutil.rmtree(target)  # os.replace moves a folder only onto an empty one
    os.replace(tmp, target)


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask
    (read from ``/proc/self/status`` on Linux; elsewhere set and restored, the stricter 077 in
    between, so a file another thread creates meanwhile is never more open than asked)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        with _UMASK_LOCK:
            mask = os.umask(0o077)
            os.umask(mask)
    return 0o666 & ~mask


def _finish(path: str) -> None:
    """The file ``path`` gets :func:`file_mode` and its data is on disk before a rename makes it
    visible (a folder is left as its writer made it)."""
    if os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, file_mode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

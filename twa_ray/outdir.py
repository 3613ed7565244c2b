"""Ownership of output folders: what wrote an ``--out``, who writes it now, what it must not touch.

Every command that writes an ``--out`` marks it with ``<command>.json`` (``run.json``,
``sweep.json``, ``average.json``: ``{"command": .., "run_id": ..}``) and holds an exclusive
``flock`` on the folder itself while it writes (a lock on the directory, so clearing the folder
never drops it). Before anything starts:

- an ``--out`` holding another output (or anything else) is refused unless ``--overwrite``,
  which deletes the old twa-ray outputs first; files twa-ray did not write are never deleted;
- ``--resume`` needs an output of the same command, and never goes with ``--overwrite``;
- an ``--out`` equal to, inside or holding an input (a store, a checkpoint folder, a data root)
  is refused: inputs are never written;
- a second writer of the same ``--out`` is refused while the first holds the lock.

A refused command leaves no trace: :func:`release_all` removes the folders this process
created that hold nothing but markers.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MARKERS", "check", "check_inputs", "claim", "keep", "lock", "mark", "owner", "release_all"]

MARKERS = {"run": "run.json", "sweep": "sweep.json", "average": "average.json"}
"""The marker of each command's output folder."""


@dataclass
class _Held:
    """A locked ``--out`` of this process; ``created``: this process made the folder."""

    path: Path
    created: bool
    fd: int
    disposable: bool = False


_HELD: list[_Held] = []


def owner(out: Path) -> tuple[str, str] | None:
    """``(command, run id)`` of the twa-ray output in ``out``, or None."""
    for command, marker in MARKERS.items():
        path = out / marker
        if path.is_file():
            try:
                d = json.loads(path.read_text())
                return str(d.get("command", command)), str(d.get("run_id", "?"))
            except (OSError, ValueError, AttributeError):
                return command, "?"
    return None


def check_inputs(out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | None]]) -> None:
    """Refuse an ``--out`` equal to or inside an input folder, or holding one.

    ``inputs``: ``(flag, path)`` pairs; URIs (``s3://``) and ``None`` are skipped."""
    o = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    for flag, path in inputs:
        if not path or "://" in path:
            continue
        p = Path(os.path.abspath(os.path.expanduser(path)))
        if o == p or p in o.parents:
            where = "is the" if o == p else "is inside the"
            raise ValueError(
                f"--out {str(out)!r} {where} {flag} folder {path!r}; inputs are never written: "
                "choose an --out outside it"
            )
        if o in p.parents:
            raise ValueError(
                f"--out {str(out)!r} holds the {flag} {path!r}; inputs are never written: "
                "choose an --out that does not contain it"
            )


def _try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive flock, or None when another holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _busy(out: Path) -> FileExistsError:
    return FileExistsError(
        f"another twa-ray command is writing to --out {str(out)!r}; wait for it to finish or "
        "choose another --out"
    )


def check(out: str | os.PathLike[str], command: str, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse ``out`` for ``command`` before anything starts; changes nothing."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other (continue or delete); pass one")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory; choose another --out")
    mine = owner(path) if path.is_dir() else None
    if resume:
        if mine is None or mine[0] != command:
            raise FileNotFoundError(f"--resume: no {command} to resume in {str(out)!r}; drop --resume")
    elif mine is not None:
        if not overwrite:
            what = f"{'an' if mine[0][0] in 'aeiou' else 'a'} {mine[0]}" + (f" ({mine[1]})" if mine[1] != "?" else "")
            fix = "--resume to continue it or " if mine[0] == command and command != "average" else ""
            raise FileExistsError(
                f"--out {str(out)!r} already holds {what}; pass {fix}--overwrite to delete it and "
                "start over, or choose another --out"
            )
    elif path.is_dir():
        foreign = sorted(p.name for p in path.iterdir())
        if foreign:
            raise FileExistsError(
                f"--out {str(out)!r} holds files twa-ray did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty --out"
            )
    if path.is_dir() and not any(h.path == path for h in _HELD):
        try:
            fd = _try_lock(path)
        except OSError:
            fd = -1  # unreadable: the write test of the command reports it
        if fd is None:
            raise _busy(path)
        if fd >= 0:
            os.close(fd)
    return path


def lock(out: str | os.PathLike[str], *, disposable: bool = False) -> Path:
    """Create ``out`` if needed and hold its exclusive lock until :func:`release_all` (or the
    process ends); a second writer gets ``FileExistsError``. ``disposable``: a failed command
    removes the folder it created whatever it holds (nothing in it can be resumed)."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if any(h.path == path for h in _HELD):
        return path
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(path)
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} is not a writable directory ({e.strerror}); choose another --out") from None
    if fd is None:
        raise _busy(path)
    _HELD.append(_Held(path, created, fd, disposable))
    return path


def keep(out: str | os.PathLike[str]) -> None:
    """``out`` holds results from now on: a later failure no longer removes it (not disposable)."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    for held in _HELD:
        if held.path == path:
            held.disposable = False


def mark(out: str | os.PathLike[str], command: str, run_id: str) -> None:
    """Write ``out``'s marker unless it holds one already (``--resume``)."""
    path = Path(out)
    if owner(path) is None:
        from twa_ray.report import write_json

        write_json(path / MARKERS[command], {"command": command, "run_id": run_id})


def claim(
    out: str | os.PathLike[str],
    command: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    keep: Iterable[str] = (),
) -> str:
    """Check ``out``, lock it, clear it (``--overwrite``; the names in ``keep`` survive an output
    of the same command) and mark it; returns the run id: new, or the resumed one."""
    check(out, command, resume=resume, overwrite=overwrite)
    path = lock(out, disposable=command == "average")
    check(path, command, resume=resume, overwrite=overwrite)  # again, now that we hold the lock
    mine = owner(path)
    if resume:
        assert mine is not None
        return mine[1]
    if overwrite and mine is not None:
        spare = set(keep) if mine[0] == command else set()  # kept only from the same command
        for child in path.iterdir():
            if child.name not in spare:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    run_id = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    mark(path, command, run_id)
    return run_id


def _only_markers(path: Path) -> bool:
    """``path`` holds nothing but markers and empty folders."""
    for root, _dirs, files in os.walk(path):
        if root == str(path) and set(files) <= set(MARKERS.values()):
            continue
        if files:
            return False
    return True


def release_all(*, failed: bool = False, created: Iterable[Path] = ()) -> None:
    """Release the locks of this process; ``failed``: also remove the folders it created (held
    ones, and ``created``) that hold nothing but markers: a refused command leaves no trace."""
    undo = set(created)
    while _HELD:
        held = _HELD.pop()
        os.close(held.fd)  # closing the descriptor releases the flock
        if held.created and failed and held.disposable:
            shutil.rmtree(held.path, ignore_errors=True)
        elif held.created:
            undo.add(held.path)
    if failed:
        for path in undo:
            if path.is_dir() and _only_markers(path):
                shutil.rmtree(path, ignore_errors=True)

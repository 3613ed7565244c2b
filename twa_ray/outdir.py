"""Ownership of where a command writes: ``--out``, ``--storage`` and an import's store.

One set of rules for a local folder, an NFS path and any ``pyarrow.fs`` URI (an S3 prefix, a
bucket root). Every command that writes a location marks it with ``<command>.json``
(``run.json``, ``sweep.json``, ``average.json``: ``{"command": .., "run_id": ..}``), written
first, before anything else. Before anything starts:

- a location holding anything twa-ray did not write is refused (one line naming a few of the
  foreign entries): a new or empty location is claimed, nothing is ever written beside a user's
  files;
- a location holding another output is refused unless ``--overwrite``, which deletes the entries
  twa-ray wrote there, one by one: the names of :data:`LAYOUT` below a marker (twa-ray alone
  creates them; a folder among them is deleted with what it holds). The location itself is never
  deleted nor emptied, so a bucket root or a shared prefix keeps everything else;
- ``--resume`` needs an output of the same command, and never goes with ``--overwrite``;
- an ``--out`` equal to, inside or holding an input (a store, a checkpoint folder, a data root)
  is refused: inputs are never written;
- one writer at a time: a local ``--out`` is held by an exclusive ``flock``; a ``--storage`` (or
  an import's store) by a lease object, :data:`LEASE`, that a heartbeat thread renews every
  ``ttl / 3`` s (``TWA_RAY_LEASE_TTL_S``, default 60). A second command is refused while the
  lease is live; a command that died frees it ``ttl`` s after its last renewal (at once when it
  ran on this machine and its process is gone), so ``--resume`` after a crash is not blocked.
  Object stores offer no compare-and-swap through ``pyarrow.fs``: a claimant writes the lease,
  waits ``min(1 s, ttl / 10)`` and reads it back; two claims whose read and write interleave
  within that window can both win (the race window). Clocks must agree within ``ttl``.

A refused command leaves no trace: :func:`release_all` releases the locks and leases of this
process and removes the folders it created that hold nothing but markers.
"""

from __future__ import annotations

import atexit
import fcntl
import fnmatch
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from twa_ray.redact import redact
from twa_ray.storage import Storage, open_storage

log = logging.getLogger(__name__)

__all__ = [
    "LAYOUT",
    "LEASE",
    "MARKERS",
    "check",
    "check_inputs",
    "check_storage",
    "claim",
    "claim_storage",
    "foreign",
    "hold",
    "keep",
    "lock",
    "mark",
    "owner",
    "release_all",
    "resume_out",
    "writable",
]

MARKERS = {"run": "run.json", "sweep": "sweep.json", "average": "average.json"}
"""The marker of each command's output."""

LEASE = ".twa-ray-lease.json"
"""The one-writer lease of a ``--storage`` or a store: ``{command, run_id, host, pid, token,
ttl_s, renewed}`` (hidden: a candidate store ignores it)."""

LAYOUT = (
    *MARKERS.values(),
    LEASE,
    "candidates",
    "full_candidates",
    "short_candidates",
    "work",
    "outputs",
    "average",
    "sampling",
    "tune",
    "plan.json",
    "import.json",
    "best_run",
    "metrics.json",
    "config.yaml",
    "model.safetensors",
    "coefficients.parquet",
    "coefficients_*.png",
    "accuracy.png",
    "trials.parquet",
    "trials.csv",
    "sweep.png",
    "best.yaml",
    "summary.json",
    ".*.tmp",
    "*.json.*.tmp",
    "config.yaml.tmp",
    "logs",  # twa_ray.errors.LOG_FILE: the tracebacks of the last failure
)
"""The top-level names twa-ray writes under a location it marked (``fnmatch`` patterns):
``--storage`` of a run (candidates, work, outputs, full_candidates, short_candidates, average), of a sweep
(plan.json, sampling, tune, outputs), an ``--out`` (the output files, and the storage layout
when no ``--storage`` is given), and temporary files of atomic writes."""

LEASE_TTL_ENV = "TWA_RAY_LEASE_TTL_S"


def _abs(out: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(out))))


def _where(where: Storage | str | os.PathLike[str]) -> Storage:
    return where if isinstance(where, Storage) else open_storage(str(_abs(where)), create=False)


def _entries(st: Storage) -> list[pafs.FileInfo]:
    """The top-level entries of ``st`` (none when it does not exist)."""
    try:
        return list(st.fs.get_file_info(pafs.FileSelector(st.path, allow_not_found=True)))
    except (OSError, pa.ArrowException) as e:
        raise ValueError(
            f"cannot list {redact(st.uri)!r} ({str(e).splitlines()[0]}); check the path and the credentials"
        ) from None


def _read(st: Storage, name: str) -> dict[str, Any] | None:
    """The JSON object ``st/name``, ``{}`` when unreadable, None when absent."""
    try:
        d = st.read_json(name)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException, ValueError):
        return {} if st.exists(name) else None
    return d if isinstance(d, dict) else {}


def owner(where: Storage | str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(command, run id)`` of the twa-ray output in ``where`` (a folder or a storage), or None."""
    st = _where(where)
    for command, marker in MARKERS.items():
        d = _read(st, marker)
        if d is not None:
            return str(d.get("command", command)), str(d.get("run_id", "?"))
    return None


def foreign(where: Storage | str | os.PathLike[str]) -> list[str]:
    """The top-level entries of ``where`` that twa-ray did not write, sorted: everything but the
    lease when it holds no marker, else what :data:`LAYOUT` does not name."""
    st = _where(where)
    names = sorted(i.base_name for i in _entries(st))
    if owner(st) is None:
        return [n for n in names if n != LEASE]
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in LAYOUT)]


def resume_out(out: str | os.PathLike[str], storage: str | None, resume: bool) -> bool:
    """Whether ``--out`` itself is resumed: with ``--storage`` a run continues from the storage
    alone, and a new (empty) ``--out`` is fine."""
    return resume and (not storage or owner(out) is not None)


def check_inputs(out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | None]]) -> None:
    """Refuse an ``--out`` equal to or inside an input folder, or holding one.

    ``inputs``: ``(flag, path)`` pairs; URIs (``s3://``) and ``None`` are skipped."""
    o = _abs(out)
    for flag, path in inputs:
        if not path or "://" in path:
            continue
        p = _abs(path)
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


def _refuse(st: Storage | None, command: str, *, resume: bool, overwrite: bool, flag: str) -> None:
    """The ownership rules (module docstring) for ``command`` writing ``st`` (None: a folder that
    does not exist yet); changes nothing. ``flag``: how the user named it (``--storage 's3://..'``)."""
    name = flag.split()[0]
    if resume and overwrite:
        raise ValueError(
            "--resume and --overwrite contradict each other (continue or delete); pass one"
        )
    mine = owner(st) if st is not None else None
    alien = foreign(st) if st is not None else []
    if alien:
        shown = ", ".join(alien[:3]) + (", ..." if len(alien) > 3 else "")
        keep = "move them out or " if mine else ""
        raise FileExistsError(
            f"{flag} holds files twa-ray did not write ({shown}); nothing there is written or "
            f"deleted: {keep}choose a new or empty {name}"
        )
    if resume and (mine is None or mine[0] != command):
        raise FileNotFoundError(f"--resume: no {command} to resume in {flag}; drop --resume")
    if mine is not None and not (resume or overwrite):
        what = f"{'an' if mine[0][0] in 'aeiou' else 'a'} {mine[0]}" + (
            f" ({mine[1]})" if mine[1] != "?" else ""
        )
        fix = "--resume to continue it or " if mine[0] == command and command != "average" else ""
        raise FileExistsError(
            f"{flag} already holds {what}; pass {fix}--overwrite to delete it and start over, or "
            f"choose another {name}"
        )


def _delete_owned(st: Storage, keep: Iterable[str] = ()) -> None:
    """Delete the entries twa-ray wrote in ``st`` (:data:`LAYOUT`), one by one, except ``keep``
    and the lease; never ``st`` itself nor an entry that LAYOUT does not name. The marker goes
    last: a crash on the way leaves an output that is still marked, or nothing."""
    spare = {LEASE, *keep}
    for info in sorted(_entries(st), key=lambda i: i.base_name in MARKERS.values()):
        n = info.base_name
        if n in spare or not any(fnmatch.fnmatchcase(n, p) for p in LAYOUT):
            continue
        if info.type == pafs.FileType.Directory:
            st.fs.delete_dir(info.path)  # a folder twa-ray created, with what it holds
        else:
            st.fs.delete_file(info.path)


def _new_id(command: str) -> str:
    return f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def mark(where: Storage | str | os.PathLike[str], command: str, run_id: str) -> None:
    """Write the marker of ``where`` unless it holds one already (``--resume``)."""
    st = _where(where)
    if owner(st) is None:
        st.write_json(MARKERS[command], {"command": command, "run_id": run_id})


# --------------------------------------------------------------------------- --storage


def check_storage(
    st: Storage, command: str, *, resume: bool = False, overwrite: bool = False, flag: str = ""
) -> None:
    """Refuse ``st`` for ``command`` before anything starts (foreign entries, another output,
    nothing to resume, a live writer); changes nothing."""
    flag = flag or f"--storage {redact(st.uri)!r}"
    if not (resume and overwrite):  # a flag error first, then a live writer, then the contents
        _check_lease(st, flag)
    _refuse(st, command, resume=resume, overwrite=overwrite, flag=flag)


def claim_storage(
    st: Storage,
    command: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    flag: str = "",
    keep: Iterable[str] = (),
) -> str:
    """Check ``st``, take its lease, delete the previous output (``--overwrite``; ``keep``
    survives one of the same command) and mark it; returns the run id: new, or the resumed one."""
    flag = flag or f"--storage {redact(st.uri)!r}"
    check_storage(st, command, resume=resume, overwrite=overwrite, flag=flag)
    mine = owner(st)
    run_id = mine[1] if resume and mine else _new_id(command)
    _acquire(st, command, run_id, flag)
    _refuse(
        st, command, resume=resume, overwrite=overwrite, flag=flag
    )  # again, now that we hold it
    if resume:
        return run_id
    if mine is not None:
        _delete_owned(st, keep if mine[0] == command else ())
    mark(st, command, run_id)
    return run_id


def hold(st: Storage, command: str, *, flag: str = "") -> str:
    """Take the lease of ``st`` for a command that adds to it (``average`` next to a run's
    candidates, ``import`` into a store): refused when it holds files twa-ray did not write
    (a store: nothing checked) or another command writes it. Returns the lease's id."""
    flag = flag or f"--storage {redact(st.uri)!r}"
    if command != "import" and foreign(st):
        _refuse(st, command, resume=False, overwrite=True, flag=flag)
    run_id = _new_id(command)
    _acquire(st, command, run_id, flag)
    return run_id


# --------------------------------------------------------------------------- leases


def _ttl() -> float:
    try:
        ttl = float(os.environ.get(LEASE_TTL_ENV, "60"))
    except ValueError:
        ttl = -1.0
    if not ttl > 0:
        raise ValueError(
            f"{LEASE_TTL_ENV}={os.environ[LEASE_TTL_ENV]!r}: expected seconds > 0; unset it or fix it"
        )
    return ttl


def _pid_gone(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


def _live(lease: dict[str, Any], now: float) -> bool:
    """A lease whose holder may still write: renewed within its ttl, and (on this machine) its
    process alive."""
    if lease.get("host") == socket.gethostname() and _pid_gone(lease.get("pid")):
        return False
    try:
        return now < float(lease["renewed"]) + float(lease["ttl_s"])
    except (KeyError, TypeError, ValueError):
        return True  # unreadable: cannot tell, so someone may be writing


def _ours(lease: dict[str, Any]) -> bool:
    return lease.get("host") == socket.gethostname() and lease.get("pid") == os.getpid()


def _busy(lease: dict[str, Any], flag: str, now: float) -> FileExistsError:
    age = now - float(lease.get("renewed", now))
    return FileExistsError(
        f"{flag} is being written by {lease.get('command', 'a twa-ray command')} {lease.get('run_id', '?')} "
        f"(pid {lease.get('pid', '?')} on {lease.get('host', '?')}, alive {age:.0f} s ago); wait for it to "
        f"finish or choose another {flag.split()[0]} (a command that died frees it "
        f"{float(lease.get('ttl_s', 0)):.0f} s after its last heartbeat)"
    )


def _check_lease(st: Storage, flag: str) -> None:
    lease = _read(st, LEASE)
    now = time.time()
    if lease is not None and not _ours(lease) and _live(lease, now):
        raise _busy(lease, flag, now)


@dataclass
class _Lease:
    """A lease this process holds, renewed by a heartbeat thread until ``stop`` is set."""

    st: Storage
    body: dict[str, Any]
    flag: str
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


_LEASES: list[_Lease] = []


def _acquire(st: Storage, command: str, run_id: str, flag: str) -> None:
    """Write the lease of ``st``, wait, read it back (the last writer wins), and renew it in a
    heartbeat thread until :func:`release_all`; ``FileExistsError`` when another holds it."""
    if any(h.st.uri == st.uri for h in _LEASES):
        return
    _check_lease(st, flag)
    ttl = _ttl()
    body = {
        "command": command,
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "ttl_s": ttl,
        "renewed": time.time(),
    }
    try:
        st.write_json(LEASE, body)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(
            f"{flag} is not writable ({str(e).splitlines()[0]}); check the path and the credentials"
        ) from None
    time.sleep(min(1.0, ttl / 10))
    now_held = _read(st, LEASE) or {}
    if now_held.get("token") != body["token"]:
        raise _busy(now_held, flag, time.time())
    held = _Lease(st, body, flag)
    held.thread = threading.Thread(
        target=_heartbeat, args=(held,), name="twa-ray-lease", daemon=True
    )
    _LEASES.append(held)
    held.thread.start()


def _heartbeat(held: _Lease) -> None:
    """Renew ``held`` every ttl / 3 s; stop (with an error line) when another command took it."""
    ttl = float(held.body["ttl_s"])
    while not held.stop.wait(ttl / 3):
        try:
            now_held = _read(held.st, LEASE) or {}
            if now_held.get("token") != held.body["token"]:
                log.error(
                    "lost the lease of %s to %s %s; stop this command: two writers now share it",
                    held.flag,
                    now_held.get("command", "?"),
                    now_held.get("run_id", "?"),
                )
                return
            held.st.write_json(LEASE, {**held.body, "renewed": time.time()})
        except (OSError, pa.ArrowException, ValueError) as e:  # transient: the next beat retries
            log.warning(
                "could not renew the lease of %s (%s)",
                held.flag,
                str(e).splitlines()[0] if str(e) else e,
            )


def _release_leases() -> None:
    """Stop the heartbeats and delete the leases this process still owns."""
    while _LEASES:
        held = _LEASES.pop()
        held.stop.set()
        if held.thread is not None:
            held.thread.join(timeout=30)
        try:
            if (_read(held.st, LEASE) or {}).get("token") == held.body["token"]:
                held.st.fs.delete_file(f"{held.st.path.rstrip('/')}/{LEASE}")
        except (OSError, pa.ArrowException):
            pass  # it expires on its own


atexit.register(_release_leases)  # a library caller's leases end with its process


# --------------------------------------------------------------------------- a local --out


@dataclass
class _Held:
    """A locked ``--out`` of this process; ``created``: this process made the folder."""

    path: Path
    created: bool
    fd: int
    disposable: bool = False


_HELD: list[_Held] = []


def _try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive flock, or None when another holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _locked(out: Path) -> FileExistsError:
    return FileExistsError(
        f"another twa-ray command is writing to --out {str(out)!r}; wait for it to finish or "
        "choose another --out"
    )


def writable(out: str | os.PathLike[str]) -> Path:
    """``out`` as a path, checked before anything is written: a directory, or a name that can be
    created (its nearest existing ancestor is a writable directory). Creates nothing: the
    command's :func:`claim` / :func:`lock` does."""
    path = Path(out).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    problem = None
    if not probe.is_dir():
        problem = "a file is in the way" if probe != path else "it is a file"
    elif not os.access(probe, os.W_OK | os.X_OK):
        problem = "permission denied"
    if problem:
        raise ValueError(
            f"--out {str(out)!r} is not a writable directory ({problem}); choose another --out"
        )
    return path


def check(
    out: str | os.PathLike[str], command: str, *, resume: bool = False, overwrite: bool = False
) -> Path:
    """Refuse ``out`` for ``command`` before anything starts; changes nothing."""
    path = _abs(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory; choose another --out")
    st = _where(path) if path.is_dir() else None
    _refuse(st, command, resume=resume, overwrite=overwrite, flag=f"--out {str(out)!r}")
    if path.is_dir() and not any(h.path == path for h in _HELD):
        try:
            fd = _try_lock(path)
        except OSError:
            fd = -1  # unreadable: the write test of the command reports it
        if fd is None:
            raise _locked(path)
        if fd >= 0:
            os.close(fd)
    return path


def lock(out: str | os.PathLike[str], *, disposable: bool = False) -> Path:
    """Create ``out`` if needed and hold its exclusive lock until :func:`release_all` (or the
    process ends); a second writer gets ``FileExistsError``. ``disposable``: a failed command
    removes the folder it created whatever it holds (nothing in it can be resumed)."""
    path = _abs(out)
    if any(h.path == path for h in _HELD):
        return path
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(path)
    except OSError as e:
        raise ValueError(
            f"--out {str(out)!r} is not a writable directory ({e.strerror}); choose another --out"
        ) from None
    if fd is None:
        raise _locked(path)
    _HELD.append(_Held(path, created, fd, disposable))
    return path


def keep(out: str | os.PathLike[str]) -> None:
    """``out`` holds results from now on: a later failure no longer removes it (not disposable)."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    for held in _HELD:
        if held.path == path:
            held.disposable = False


def claim(
    out: str | os.PathLike[str],
    command: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    keep: Iterable[str] = (),
    run_id: str | None = None,
) -> str:
    """Check ``out``, lock it, delete the previous output (``--overwrite``; ``keep`` survives
    one of the same command) and mark it (``run_id``, default a new one); returns the run id:
    that, or the resumed one."""
    check(out, command, resume=resume, overwrite=overwrite)
    path = lock(out, disposable=command == "average")
    check(path, command, resume=resume, overwrite=overwrite)  # again, now that we hold the lock
    mine = owner(path)
    if resume:
        assert mine is not None
        return mine[1]
    if mine is not None:
        _delete_owned(_where(path), keep if mine[0] == command else ())
    run_id = run_id or _new_id(command)
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
    """Release the locks and leases of this process; ``failed``: also remove the folders it
    created (held ones, and ``created``) that hold nothing but markers: a refused command leaves
    no trace."""
    _release_leases()
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

"""Ownership of where a command writes: ``--out``, ``--storage`` and an import's store.

One set of rules for a local folder, an NFS path and any ``pyarrow.fs`` URI (an S3 prefix, a
bucket root). Every command that writes a location marks it with ``<command>.json``
(``run.json``, ``sweep.json``, ``average.json``: ``{"command": .., "run_id": ..}``), written
first, before anything else. Before anything starts:

- a location holding anything twa-ray did not write is refused (one line naming a few of the
  foreign entries): a new or empty location is claimed, nothing is ever written beside a user's
  files;
- inside a marked location, what twa-ray writes is known at every depth (:data:`LAYOUT`, a
  tree of name patterns: ``outputs/metrics.json``, ``candidates/<name>.arrow``,
  ``work/sampling_<run id>.json``, ...); an entry it does not name, at any depth (a user's
  report in ``outputs/``), is foreign too, and refuses the command the same way. Ray writes
  its own trees below folders twa-ray names: Ray Train the run ``work/ray_train/sampling_<run
  id>`` (and ``twa_<run id>``; ``ray_train/sampling_*`` of a sweep's sampling run), Tune the
  experiment ``tune/sweep``. Those folders are Ray's whole: twa-ray names them, Ray fills them
  (checkpoints, state files whose names Ray chooses and changes between versions), so they are
  owned, and deleted, as a whole;
- a location holding another output is refused unless ``--overwrite``, which deletes the entries
  twa-ray wrote there, one by one (a folder of :data:`LAYOUT` entry by entry, then the folder
  once empty). The location itself is never deleted nor emptied, so a bucket root or a shared
  prefix keeps everything else;
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

A command goes through these steps in one order, in one context manager (:func:`claimed`)::

    with outdir.claimed(Request("run", out, storage, resume=.., overwrite=..)) as outputs:
        # checked: the inputs, --out, the storage (nothing written yet)
        ...                    # the command's own checks: data, model, connect Ray, resources
        outputs.claim()        # locked / leased, the previous output deleted, marked
        ...                    # the work; outputs.keep(), outputs.publish()
    # released: locks and leases; a failed command removes what it created (markers only)

A refused command leaves no trace: the folders it created that hold nothing but markers are
removed.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import fnmatch
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs

from twa_ray.redact import redact
from twa_ray.storage import Storage, open_storage

log = logging.getLogger(__name__)

__all__ = ["Request", "Outputs", "claimed", "owner", "foreign", "MARKERS", "LAYOUT", "LEASE"]

MARKERS = {"run": "run.json", "sweep": "sweep.json", "average": "average.json"}
"""The marker of each command's output."""

LEASE = ".twa-ray-lease.json"
"""The one-writer lease of a ``--storage`` or a store: ``{command, run_id, host, pid, token,
ttl_s, renewed}`` (hidden: a candidate store ignores it)."""

ALL = "all"
"""A file, or a folder written wholly by twa-ray or by Ray (deleted with what it holds)."""

_TMP = {".*.tmp": ALL, "*.*.tmp": ALL}  # temporary files (and folders) of atomic writes
_OUTPUT_FILES = {
    n: ALL
    for n in (
        "metrics.json",
        "config.yaml",
        "model.safetensors",
        "model.safetensors.index.json",  # a sharded model's (strategy fsdp): the index...
        "model-*-of-*.safetensors",  # ...and its files
        "coefficients.parquet",
        "coefficients_*.png",
        "accuracy.png",
        "trials.parquet",
        "trials.csv",
        "sweep.png",
        "best.yaml",
        "summary.json",
    )
}
_STORE = {"*.arrow": ALL, **_TMP}  # a candidate store: <name>.arrow
# Ray Train writes the run twa-ray names ``sampling_<run id>`` / ``twa_<run id>`` under
# ``ray_train/``: its checkpoints and state are Ray's, all of it ours
_RAY_TRAIN = {"sampling_*": ALL, "twa_*": ALL}
_WORK = {"ray_train": _RAY_TRAIN, "sampling_*.json": ALL, "twa_*.json": ALL, **_TMP}
_GROUP = {"candidates": _STORE, "sampling_done.json": ALL, **_WORK}  # a sweep's sampling run

LAYOUT: dict[str, Any] = {
    **{m: ALL for m in MARKERS.values()},
    LEASE: ALL,
    "candidates": _STORE,
    "full_candidates": _STORE,
    "short_candidates": _STORE,
    "work": _WORK,
    "outputs": {**_OUTPUT_FILES, **_TMP},
    "average": {**_OUTPUT_FILES, **_TMP},
    "sampling": {"*": _GROUP},
    "tune": {"sweep": ALL},  # the Tune experiment, Ray's
    "plan.json": ALL,
    "import.json": ALL,
    "hf_model": {"*.json": ALL, "*.safetensors": ALL},
    "logs": ALL,  # twa_ray.errors.LOG_FILE: the tracebacks of the last failure
    **_OUTPUT_FILES,
    **_TMP,
}
"""What twa-ray writes under a location it marked, as a tree of ``fnmatch`` patterns: a name
maps to :data:`ALL` or to the patterns of the folder's own entries. ``--storage`` of a run
(candidates, work, outputs, full_candidates, short_candidates, average), of a sweep (plan.json,
sampling, tune, outputs), an ``--out`` (the output files, ``best_run``: the run of a sweep's
``best.yaml``, and the storage layout when no ``--storage`` is given), and temporary files of
atomic writes."""
LAYOUT["best_run"] = LAYOUT

LEASE_TTL_ENV = "TWA_RAY_LEASE_TTL_S"


def _abs(out: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(out))))


def _where(where: Storage | str | os.PathLike[str]) -> Storage:
    return where if isinstance(where, Storage) else open_storage(str(_abs(where)), create=False)


def _entries(st: Storage, path: str | None = None) -> list[pafs.FileInfo]:
    """The entries of the folder ``path`` of ``st`` (default: its top), sorted by name (none
    when it does not exist)."""
    sel = pafs.FileSelector(path or st.path, allow_not_found=True)
    try:
        return sorted(st.fs.get_file_info(sel), key=lambda i: i.base_name)
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


def _spec(name: str, layout: dict[str, Any]) -> Any:
    """What ``layout`` says of the entry ``name``: :data:`ALL`, a folder's layout, or None
    (twa-ray does not write that name there)."""
    return next((v for p, v in layout.items() if fnmatch.fnmatchcase(name, p)), None)


def _walk(
    st: Storage, path: str, layout: dict[str, Any], rel: str = ""
) -> Iterator[tuple[pafs.FileInfo, str, Any]]:
    """``(info, path relative to st, spec)`` of every entry below ``path`` the walk reaches:
    the entries of each folder :data:`LAYOUT` describes (one it maps to :data:`ALL` is not
    entered)."""
    for info in _entries(st, path):
        spec = _spec(info.base_name, layout)
        yield info, f"{rel}{info.base_name}", spec
        if isinstance(spec, dict) and info.type == pafs.FileType.Directory:
            yield from _walk(st, info.path, spec, f"{rel}{info.base_name}/")


def foreign(where: Storage | str | os.PathLike[str]) -> list[str]:
    """The entries of ``where`` that twa-ray did not write, sorted, as paths relative to it:
    every top-level entry but the lease when it holds no marker, else, at every depth, what
    :data:`LAYOUT` does not name (not entered further)."""
    st = _where(where)
    if owner(st) is None:
        return sorted(i.base_name for i in _entries(st) if i.base_name != LEASE)
    return [rel for _info, rel, spec in _walk(st, st.path, LAYOUT) if spec is None]


def _resume_out(out: str | os.PathLike[str], storage: str | None, resume: bool) -> bool:
    """Whether ``--out`` itself is resumed: with ``--storage`` a run continues from the storage
    alone, and a new (empty) ``--out`` is fine."""
    return resume and (not storage or owner(out) is not None)


def _check_inputs(out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | None]]) -> None:
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
    """Delete the entries twa-ray wrote in ``st`` (:data:`LAYOUT`, at every depth), one by one,
    except the top-level ``keep`` and the lease; never ``st`` itself nor an entry that LAYOUT
    does not name (:func:`foreign` refused those before). A folder LAYOUT describes goes once
    it is empty; the marker goes last: a crash on the way leaves an output that is still
    marked, or nothing."""
    spare = {LEASE, *keep}
    top = [i for i in _entries(st) if i.base_name not in spare]
    for info in sorted(top, key=lambda i: i.base_name in MARKERS.values()):
        _delete_entry(st, info, _spec(info.base_name, LAYOUT))


def _delete_entry(st: Storage, info: pafs.FileInfo, spec: Any) -> None:
    if spec is None:
        return
    if info.type != pafs.FileType.Directory:
        st.fs.delete_file(info.path)
    elif spec == ALL:
        st.fs.delete_dir(info.path)  # a folder twa-ray (or Ray) wrote, with what it holds
    else:
        for child in _entries(st, info.path):
            _delete_entry(st, child, _spec(child.base_name, spec))
        if not _entries(st, info.path):
            st.fs.delete_dir(info.path)


def _new_id(command: str) -> str:
    return f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _mark(where: Storage | str | os.PathLike[str], command: str, run_id: str) -> None:
    """Write the marker of ``where`` unless it holds one already (``--resume``)."""
    st = _where(where)
    if owner(st) is None:
        st.write_json(MARKERS[command], {"command": command, "run_id": run_id})


# --------------------------------------------------------------------------- --storage


def _check_storage(
    st: Storage, command: str, *, resume: bool = False, overwrite: bool = False, flag: str = ""
) -> None:
    """Refuse ``st`` for ``command`` before anything starts (foreign entries, another output,
    nothing to resume, a live writer); changes nothing."""
    flag = flag or f"--storage {redact(st.uri)!r}"
    if not (resume and overwrite):  # a flag error first, then a live writer, then the contents
        _check_lease(st, flag)
    _refuse(st, command, resume=resume, overwrite=overwrite, flag=flag)


def _claim_storage(
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
    _check_storage(st, command, resume=resume, overwrite=overwrite, flag=flag)
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
    _mark(st, command, run_id)
    return run_id


def _hold(st: Storage, command: str, *, flag: str = "") -> str:
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


def _writable(out: str | os.PathLike[str]) -> Path:
    """``out`` as a path, checked before anything is written: a directory, or a name that can be
    created (its nearest existing ancestor is a writable directory). Creates nothing: the
    command's :func:`_claim` / :func:`_lock` does."""
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


def _check(
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


def _lock(out: str | os.PathLike[str], *, disposable: bool = False) -> Path:
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


def _keep(out: str | os.PathLike[str]) -> None:
    """``out`` holds results from now on: a later failure no longer removes it (not disposable)."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    for held in _HELD:
        if held.path == path:
            held.disposable = False


def _claim(
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
    _check(out, command, resume=resume, overwrite=overwrite)
    path = _lock(out, disposable=command == "average")
    _check(path, command, resume=resume, overwrite=overwrite)  # again, now that we hold the lock
    mine = owner(path)
    if resume:
        assert mine is not None
        return mine[1]
    if mine is not None:
        _delete_owned(_where(path), keep if mine[0] == command else ())
    run_id = run_id or _new_id(command)
    _mark(path, command, run_id)
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


# --------------------------------------------------------------------------- the lifecycle


@dataclass(frozen=True)
class Request:
    """What a command asks of the places it writes, as the user gave it."""

    command: Literal["run", "sweep", "average", "import"]
    out: str  # --out: a local folder (import: the store, a path or a URI)
    storage: str | None = None  # --storage (run, sweep: None is --out; average: a run's, added to)
    resume: bool = False  # --resume: continue the output of the same command
    overwrite: bool = False  # --overwrite: delete the previous twa-ray output first
    address: str | None = None  # --address of Ray (None: RAY_ADDRESS or a local Ray)
    inputs: tuple[tuple[str, str | None], ...] = ()  # (flag, path) of the inputs: never written
    keep: tuple[str, ...] = ()  # top-level names --overwrite keeps of the same command's output

    @property
    def flag(self) -> str:
        """How the user named the location the command marks and leases."""
        if self.command == "import" or not self.storage:
            return f"--out {self.out!r}"
        return f"--storage {redact(self.storage)!r}"


class Outputs:
    """The outputs of one command, inside :func:`claimed`: ``out`` (the local ``--out``;
    import: None), ``storage`` (where it leases and marks: ``--storage``, ``--out``, the store;
    average without ``--storage``: None) and, after :meth:`claim`, ``run_id``."""

    def __init__(self, req: Request) -> None:
        self.req = req
        self.run_id: str | None = None
        self.created: list[Path] = []  # folders this command made (removed if it fails early)
        self.out: Path | None = None
        self.storage: Storage | None = None
        self.resume_out = False  # --out itself is resumed (with --storage it may be new)

    def _check(self) -> None:
        """The inputs, ``--out`` and the storage, refused before anything starts."""
        req = self.req
        if req.command == "import":
            _check_inputs(req.out, req.inputs)
            if "://" not in req.out and not os.path.exists(req.out):
                self.created.append(_abs(req.out))
            self.storage = open_storage(req.out, create=False)
            return
        self.out = _writable(req.out).resolve()
        _check_inputs(req.out, req.inputs)
        self.created += [] if self.out.exists() else [self.out]
        self.resume_out = _resume_out(self.out, req.storage, req.resume)
        _check(req.out, req.command, resume=self.resume_out, overwrite=req.overwrite)
        if req.command == "average":
            self._check_average()
        else:
            self._check_storage()

    def _check_storage(self) -> None:
        """run, sweep: ``--storage`` (default ``--out``), refused before anything starts."""
        req = self.req
        where = req.storage or str(self.out)
        if "://" not in where and not os.path.exists(where):
            self.created.append(_abs(where))
        self.storage = open_storage(where, create="://" in where)  # a URI: probed by creating it
        _check_storage(
            self.storage, req.command, resume=req.resume, overwrite=req.overwrite, flag=req.flag
        )

    def _check_average(self) -> None:
        """average: a run's ``--storage`` it adds ``average/`` to, refused when foreign files
        lie there or another command writes it."""
        if not self.req.storage:
            return
        self.storage = open_storage(self.req.storage, create=False)
        if foreign(self.storage):
            _refuse(self.storage, "average", resume=False, overwrite=True, flag=self.req.flag)
        _check_lease(self.storage, self.req.flag)

    @property
    def elsewhere(self) -> bool:
        """The storage is not the local ``--out`` (it gets a copy of the outputs)."""
        st = self.storage
        return st is not None and not (
            st.local and self.out is not None and st.path == str(self.out)
        )

    def claim(self) -> str:
        """Lock ``--out``, take the storage's lease, delete the previous output
        (``--overwrite``) and mark both with one id; returns it (new, or the resumed one)."""
        req, st = self.req, self.storage
        if req.command == "import":
            assert st is not None
            self.run_id = _hold(st, "import", flag=req.flag)  # one import at a time
            return self.run_id
        assert self.out is not None
        if req.command == "average":
            if st is not None:
                _hold(st, "average", flag=req.flag)
            self.run_id = _claim(self.out, "average", overwrite=req.overwrite, keep=req.keep)
            return self.run_id
        assert st is not None
        _lock(self.out)
        if st.local:
            os.makedirs(st.path, exist_ok=True)
        self.run_id = _claim_storage(
            st, req.command, resume=req.resume, overwrite=req.overwrite, flag=req.flag
        )
        if self.elsewhere:
            _claim(
                self.out,
                req.command,
                resume=self.resume_out,
                overwrite=req.overwrite,
                run_id=self.run_id,
            )
        return self.run_id

    def keep(self) -> None:
        """``--out`` holds results from now on: a later failure no longer removes it."""
        if self.out is not None:
            _keep(self.out)

    def publish(self, rel: str = "outputs") -> None:
        """Copy the output files of ``--out`` to ``rel/`` of the storage when it is elsewhere."""
        if self.elsewhere and self.out is not None:
            assert self.storage is not None
            self.storage.upload_outputs(self.out, rel, skip=set(MARKERS.values()))


@contextlib.contextmanager
def claimed(req: Request) -> Iterator[Outputs]:
    """Check the inputs, ``--out`` and the storage of ``req`` (nothing written), yield its
    :class:`Outputs` (the command claims them with :meth:`Outputs.claim` once its own checks
    passed), and release the locks and leases at the end; a failed command removes the folders
    it created that hold nothing but markers (an average's: whatever they hold)."""
    outputs = Outputs(req)
    failed = True
    try:
        outputs._check()
        yield outputs
        failed = False
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what ran is kept, --resume continues it
        failed = False
        raise
    finally:
        release_all(failed=failed, created=outputs.created)

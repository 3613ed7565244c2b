"""Every failure as one line with its class, wherever it was raised.

:func:`describe` turns an exception into a :class:`TwaError`: one line naming the cause and the
fix, a ``kind`` that gives the exit code and whether a retry can help:

- ``usage`` (exit 2): bad input or configuration, a diverged run, a full disk, a denied
  permission, a missing file, an error in the user's model or data function. The same command
  fails the same way again: no retry.
- ``runtime`` (exit 1): anything else. A lost worker or a network error is retried (the
  workers restart from the last checkpoint, up to ``--max-failures`` times); a bug (a
  ``TypeError``, ``KeyError``, ...) is not: it would be raised again.

A Ray Train worker raises the :class:`TwaError` of what it caught (its class is resolved there,
where the user's modules import), so only strings cross the Ray boundary: the driver never has
to unpickle a user's exception class. ``details`` keeps the full traceback for the log file
(:func:`write_log`); the console shows the line only.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import traceback
from pathlib import Path

from twa_ray.redact import redact

__all__ = [
    "EXIT_CODES",
    "LOG_FILE",
    "RUNTIME",
    "USAGE",
    "TwaError",
    "describe",
    "user_code",
    "write_log",
]

USAGE, RUNTIME = "usage", "runtime"
EXIT_CODES = {USAGE: 2, RUNTIME: 1}
LOG_FILE = "logs/twa-ray-error.log"
"""Under a command's ``--out``: the full tracebacks of its last failure."""

# write failures that mean "the disk (or the quota, or the file-size limit) is full"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM)
# the same, as pyarrow and object stores word them when no errno comes with the error
_MESSAGES = (
    (re.compile(r"No space left on device", re.I), errno.ENOSPC),
    (re.compile(r"quota ?exceeded", re.I), errno.EDQUOT),
    (re.compile(r"Read-only file system", re.I), errno.EROFS),
    (re.compile(r"Permission denied|AccessDenied|Access Denied|ACCESS_DENIED", re.I), errno.EACCES),
)
# a path quoted in pyarrow's message: "Failed to open local file '/a/b'"
_QUOTED_PATH = re.compile(r"'((?:/|[a-z0-9]+://)[^']+)'")
# usage errors by class: a retry raises them again
_USAGE_TYPES = (ValueError, FloatingPointError)
# a bug (ours or the user's): a runtime failure with its traceback, that a retry raises again
_BUGS = (TypeError, LookupError, AttributeError, NameError, NotImplementedError, AssertionError)
_USAGE_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


class TwaError(Exception):
    """A failure in one line. ``kind``: ``usage`` (exit 2) or ``runtime`` (exit 1); ``retry``:
    whether restarting the workers can help; ``details``: the full traceback text. Its
    arguments are strings and a bool: it pickles without any user class."""

    def __init__(
        self, line: str, kind: str = USAGE, retry: bool = False, details: str = ""
    ) -> None:
        super().__init__(line, kind, retry, details)
        self.line, self.kind, self.retry, self.details = line, kind, retry, details

    def __str__(self) -> str:
        return self.line

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


def _one_line(text: str) -> str:
    return redact(" ".join(str(text).split()))


def _storage_errno(e: OSError) -> int | None:
    """The errno of a storage failure: the error's own, else read from pyarrow's wording."""
    if e.errno in (*_DISK_FULL, *_DENIED, errno.EROFS):
        return e.errno
    return next((code for pattern, code in _MESSAGES if pattern.search(str(e))), None)


def _storage_line(e: OSError, again: str, where: str | None) -> str | None:
    """One line for a full disk, a denied permission or a read-only file system, naming the
    path (redacted; pyarrow names it in its message, if at all: then ``where``, the location
    being written) and the fix; None for another OSError."""
    code = _storage_errno(e)
    if code is None:
        return None
    name = errno.errorcode.get(code, str(code))
    quoted = _QUOTED_PATH.search(str(e))
    if e.filename:
        at, cause = f" at {redact(str(e.filename))}", f"({name}: {os.strerror(code)})"
    else:
        at = f" at {redact(quoted[1])}" if quoted else f" under {redact(where)}" if where else ""
        cause = f"({name}: {_one_line(str(e))})"
    # writes are atomic (temp file + rename): what failed left no partial file behind
    kept = "nothing half-written was kept"
    if code in _DISK_FULL:
        return (
            f"out of disk space{at} {cause}; {kept}: free space or point --out / --storage at a "
            f"larger disk, then {again}"
        )
    what = "read-only file system" if code == errno.EROFS else "permission denied"
    return (
        f"{what}{at} {cause}; {kept}: give this user write access there or point --out / "
        f"--storage elsewhere, then {again}"
    )


def describe(
    e: BaseException, *, again: str = "rerun with --resume", where: str | None = None
) -> TwaError:
    """The :class:`TwaError` of ``e`` (``again``: how to continue after fixing the cause;
    ``where``: the location being written, named when the error does not name its path)."""
    if isinstance(e, TwaError):
        return e
    from twa_ray.storage import storage_fault

    details = "".join(traceback.format_exception(e))
    line = (_storage_line(e, again, where) if isinstance(e, OSError) else None) or storage_fault(e)
    if line is not None:
        return TwaError(line, USAGE, False, details)
    if isinstance(e, (*_USAGE_TYPES, *_USAGE_OS_ERRORS)):
        return TwaError(_one_line(str(e)), USAGE, False, details)
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda: the batch or the model is too big
        line = f"out of GPU memory ({_one_line(str(e))}); lower --batch-size or use a smaller model"
        return TwaError(line, USAGE, False, details)
    line = _one_line(f"{type(e).__name__}: {e}")
    return TwaError(line, RUNTIME, not isinstance(e, _BUGS), details)


def user_code(what: str, e: Exception) -> TwaError:
    """An exception raised by the user's code (``what``: "the model 'pkg.mod:Net' (forward)"):
    a usage error, never retried, whatever its class."""
    details = "".join(traceback.format_exception(e))
    line = _one_line(f"{what} raised {type(e).__name__}: {e}")
    return TwaError(f"{line}; fix it", USAGE, False, details)


def write_log(error: TwaError, out: str | os.PathLike[str] | None) -> str | None:
    """Write ``error.details`` to ``out``/:data:`LOG_FILE` (a local folder that holds a
    twa-ray output), else to a file in the temp folder; returns its path (None: nothing to write, or
    no place could take it: a full disk)."""
    if not error.details:
        return None
    text = f"twa-ray: error: {error.line}\n\n{redact(error.details)}"
    from twa_ray.outdir import MARKERS

    places = []
    if out is not None and "://" not in str(out):
        if any(os.path.exists(os.path.join(out, m)) for m in MARKERS.values()):
            places.append(Path(out) / LOG_FILE)
    places.append(Path(tempfile.gettempdir()) / f"twa-ray-error-{os.getpid()}.log")
    for path in places:
        try:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            return str(path)
        except OSError:
            continue
    return None

"""Build, cache and call the CPU kernels of ``packed.c`` (packed-code project / reconstruct).

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``): ``-O3 -march=native -fopenmp`` (no ``-ffast-math``: see ``_COMMON``), retried
without ``-march=native`` and without OpenMP when those fail. The shared library is cached in
``$TWA_RAY_CACHE_DIR`` (default ``$XDG_CACHE_HOME/twa_ray/kernels``, i.e.
``~/.cache/twa_ray/kernels``) under a name keyed by the source, the compiler, the flags and the
CPU, and written atomically (temp file + ``os.replace``), so concurrent processes (Ray workers)
never load a half-written file and a shared home directory never hands one CPU's
``-march=native`` build to another. :func:`load` returns ``None`` when nothing compiles; callers
then use the pure-torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from twa_ray.core.quant import PackedMatrix

__all__ = ["build", "cache_dir", "load", "project_", "reconstruct_"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("packed.c")
ABI_VERSION = 1
# Reassociation lets the portable loops vectorize their float reductions. Not -ffast-math: with
# GCC < 13 it links crtfastmath.o into the shared library, whose constructor turns on
# flush-to-zero / denormals-are-zero for the whole process when the library is loaded.
_COMMON = (
    "-shared",
    "-fPIC",
    "-std=gnu11",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
)
_FLAG_SETS = (  # tried in order
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$TWA_RAY_CACHE_DIR`` or ``~/.cache/twa_ray/kernels``."""
    if os.environ.get("TWA_RAY_CACHE_DIR"):
        return Path(os.environ["TWA_RAY_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "twa_ray" / "kernels"


def _cpu_id() -> str:
    """Model name and feature flags of this CPU (``-march=native`` builds are CPU-specific)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [
            ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")
        ]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> bool:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    cmd = [cc, *flags, *_COMMON, str(SOURCE), "-o", str(tmp)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("kernel compile failed to run: %s", e)
        return False
    if res.returncode != 0:
        log.debug("kernel compile failed: %s\n%s", " ".join(cmd), res.stderr)
        tmp.unlink(missing_ok=True)
        return False
    os.replace(tmp, target)  # atomic: readers see the old file or the whole new one
    return True


def _writable_dir() -> Path:
    for d in (cache_dir(), Path(tempfile.gettempdir()) / f"twa_ray-kernels-{os.getuid()}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise OSError("no writable directory for the compiled kernels; set TWA_RAY_CACHE_DIR")


def _compiler() -> str | None:
    return (
        os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    )


def build(flags: tuple[str, ...], cc: str | None = None) -> ctypes.CDLL | None:
    """Compile (or reuse the cached build of) ``packed.c`` with ``flags`` and load it."""
    cc = cc or _compiler()
    if cc is None:
        return None
    parts = [
        SOURCE.read_bytes(),
        cc.encode(),
        " ".join(flags + _COMMON).encode(),
        _cpu_id().encode(),
    ]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    path = _writable_dir() / f"packed-{key}.so"
    if not path.exists() and not _compile(cc, flags, path):
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.debug("cannot load %s: %s", path, e)
        return None
    if lib.twa_abi_version() != ABI_VERSION:
        return None
    _declare(lib)
    log.debug("packed kernels: %s (%s)", path, " ".join(flags))
    return lib


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library for this machine (built and cached on first use), or ``None``."""
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: packed projections use the slower torch path")
        return None
    try:
        _writable_dir()
    except OSError as e:
        log.warning("%s: packed projections use the slower torch path", e)
        return None
    for flags in _FLAG_SETS:
        lib = build(flags, cc)
        if lib is not None:
            return lib
    log.warning("the packed kernels did not compile with %s: using the slower torch path", cc)
    return None


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    # bits, R, L, data, row stride, bounds, byte_bounds, scale, zero
    common: list[Any] = [c_int, i64, i64, ptr, i64, ptr, ptr, ptr, ptr]
    lib.twa_project.argtypes = [*common, ptr, ptr, c_int]  # g, a, threads
    lib.twa_project.restype = c_int
    lib.twa_reconstruct.argtypes = [*common, ptr, ptr, ptr, c_int]  # alpha, origin, out, threads
    lib.twa_reconstruct.restype = c_int


@functools.lru_cache(maxsize=256)
def _offsets(bounds: tuple[int, ...]) -> ctypes.Array:
    return (ctypes.c_int64 * len(bounds))(*bounds)


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("the packed kernel could not allocate its work buffers")


def project_(lib: ctypes.CDLL, pm: PackedMatrix, g: torch.Tensor, out: torch.Tensor) -> None:
    """``out (R, L) = project(pm, g)``; all tensors CPU float32 contiguous (``pm.data`` strided rows ok)."""
    scale, zero = pm.scale.contiguous(), pm.zero.contiguous()
    rc = lib.twa_project(
        pm.bits, pm.num_rows, pm.num_blocks, pm.data.data_ptr(), pm.data.stride(0),
        _offsets(pm.bounds), _offsets(pm.byte_bounds), scale.data_ptr(), zero.data_ptr(),
        g.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc)


def reconstruct_(
    lib: ctypes.CDLL,
    pm: PackedMatrix,
    alpha: torch.Tensor,
    origin: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``out (D,) = reconstruct(pm, alpha, origin)``; ``origin`` may be ``out`` itself."""
    scale, zero = pm.scale.contiguous(), pm.zero.contiguous()
    rc = lib.twa_reconstruct(
        pm.bits, pm.num_rows, pm.num_blocks, pm.data.data_ptr(), pm.data.stride(0),
        _offsets(pm.bounds), _offsets(pm.byte_bounds), scale.data_ptr(), zero.data_ptr(),
        alpha.data_ptr(), None if origin is None else origin.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    _check(rc)

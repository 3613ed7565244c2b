"""Build, cache, choose and call the CPU kernels of ``packed.c`` (packed-code project / reconstruct).

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``), once per kernel path (see :data:`PATHS`) with that path's instruction-set flags,
and linked into one shared library; a path whose object does not compile is left out. The
library checks at run time which paths this CPU can run, so it never executes an instruction
the CPU lacks. Nothing is built with ``-march=native``.

Which path runs is chosen by measurement: when the library is built, every path the CPU
supports is timed on a small matrix (project + reconstruct, every bit width, one thread) and
the fastest is recorded next to the library. ``TWA_RAY_KERNEL_PATH=<path>`` forces a path
(tests, benchmarks). :func:`kernel_info` says what runs and why.

Both files are cached in ``$TWA_RAY_CACHE_DIR`` (default ``$XDG_CACHE_HOME/twa_ray/kernels``,
i.e. ``~/.cache/twa_ray/kernels``) under a name keyed by the source, the compiler, the flags and
the CPU (model and feature flags), and written atomically (:mod:`twa_ray.core.atomic`), so
concurrent processes (Ray workers) never load a half-written file and a shared home directory
never hands one CPU's measurement to another. :func:`load` returns ``None`` when nothing
compiles; callers then use the pure-torch path.

Threads: the kernels run on ``torch.get_num_threads()`` threads (Ray sets ``OMP_NUM_THREADS``
from a worker's CPUs, and torch follows it) of the library's own pool, whose idle threads sleep
instead of spinning (see ``packed.c``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from twa_ray.core.atomic import atomic_path, publish

if TYPE_CHECKING:
    from twa_ray.core.quant import PackedMatrix

__all__ = [
    "PATHS",
    "available",
    "build",
    "cache_dir",
    "choose",
    "cpu_model",
    "kernel_info",
    "library_file",
    "load",
    "measure",
    "path_index",
    "project_",
    "reconstruct_",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("packed.c")
ABI_VERSION = 2
ENV_PATH = "TWA_RAY_KERNEL_PATH"
# Kernel paths in the library's order (packed.c: PATHS) and the flags of their objects.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
PATHS = ("portable", "avx2", "avx512", "avx2sub")
_PATH_FLAGS: dict[str, tuple[str, ...]] = {
    # reassociation lets the portable loops vectorize their float reductions; the other paths
    # vectorize by hand and keep a fixed order of operations (results do not depend on aliasing)
    "portable": ("-DTWA_PATH_PORTABLE", "-DTWA_MAIN", "-fassociative-math", "-fno-signed-zeros"),
    "avx2": ("-DTWA_PATH_AVX2", "-mavx2", "-mfma"),
    "avx512": ("-DTWA_PATH_AVX512", "-mavx512f", "-mavx2", "-mfma"),
    "avx2sub": ("-DTWA_PATH_AVX2SUB", "-mavx2", "-mfma"),
}
# Not -ffast-math: with GCC < 13 it links crtfastmath.o into the shared library, whose
# constructor turns on flush-to-zero / denormals-are-zero for the whole process when the library
# is loaded.
_COMMON = ("-fPIC", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math")
_OPT = ("-O3",)


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$TWA_RAY_CACHE_DIR`` or ``~/.cache/twa_ray/kernels``."""
    if os.environ.get("TWA_RAY_CACHE_DIR"):
        return Path(os.environ["TWA_RAY_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "twa_ray" / "kernels"


def _cpu_id() -> str:
    """Model name and feature flags of this CPU (the measured choice is CPU-specific)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [
            ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")
        ]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.processor() + platform.machine()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` shows it, with family / model numbers on x86."""
    fields: dict[str, str] = {}
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = ln.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _run(cmds: list[list[str]]) -> list[bool]:
    """Run the compiler commands side by side; which succeeded."""
    procs: list[subprocess.Popen | None] = []
    for cmd in cmds:
        try:
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            )
        except OSError as e:
            log.debug("kernel compile failed to run: %s", e)
            procs.append(None)
    ok = []
    for cmd, proc in zip(cmds, procs):
        if proc is None:
            ok.append(False)
            continue
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            log.debug("kernel compile failed: %s\n%s", " ".join(cmd), err)
        ok.append(proc.returncode == 0)
    return ok


def _compile(cc: str, opt: tuple[str, ...], paths: tuple[str, ...], target: Path) -> bool:
    """One object per path, compiled side by side (a path that fails to compile is left out;
    portable must compile), linked into ``target``."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objs = [os.path.join(tmp, f"{name}.o") for name in paths]
        cmds = [
            [cc, "-c", *opt, *_COMMON, *_PATH_FLAGS[name], str(SOURCE), "-o", obj]
            for name, obj in zip(paths, objs)
        ]
        ok = _run(cmds)
        if not ok[0]:  # portable
            return False
        objs = [obj for obj, good in zip(objs, ok) if good]
        lib = os.path.join(tmp, target.name)
        if not _run([[cc, "-shared", "-pthread", *objs, "-o", lib]])[0]:
            return False
        publish(lib, target)  # tmp is next to target: one atomic rename
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


def _paths_built() -> tuple[str, ...]:
    return PATHS if _X86 else ("portable",)


def library_file(opt: tuple[str, ...], cc: str) -> Path:
    """The cached library's file: keyed by source, compiler, flags and CPU (model and feature
    flags), so a library (and its measured choice) is never used on another kind of CPU."""
    parts = [
        SOURCE.read_bytes(),
        cc.encode(),
        " ".join(opt + _COMMON).encode(),
        repr([_PATH_FLAGS[p] for p in _paths_built()]).encode(),
        _cpu_id().encode(),
    ]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    return _writable_dir() / f"packed-{key}.so"


def build(opt: tuple[str, ...] = _OPT, cc: str | None = None) -> ctypes.CDLL | None:
    """Compile (or reuse the cached build of) ``packed.c`` with optimization flags ``opt`` and
    load it; the library's path is ``lib._name``."""
    cc = cc or _compiler()
    if cc is None:
        return None
    path = library_file(opt, cc)
    if not path.exists() and not _compile(cc, opt, _paths_built(), path):
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.debug("cannot load %s: %s", path, e)
        return None
    if lib.twa_abi_version() != ABI_VERSION:
        return None
    _declare(lib)
    log.debug("packed kernels: %s (%s)", path, " ".join(opt))
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
    lib = build(_OPT, cc)
    if lib is None:
        log.warning("the packed kernels did not compile with %s: using the slower torch path", cc)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    # path, bits, R, L, data, row stride, bounds, byte_bounds, scale, zero
    common: list[Any] = [c_int, c_int, i64, i64, ptr, i64, ptr, ptr, ptr, ptr]
    lib.twa_project.argtypes = [*common, ptr, ptr, c_int]  # g, a, threads
    lib.twa_project.restype = c_int
    lib.twa_reconstruct.argtypes = [*common, ptr, ptr, ptr, c_int]  # alpha, origin, out, threads
    lib.twa_reconstruct.restype = c_int
    lib.twa_path_available.argtypes = [c_int]
    lib.twa_path_name.argtypes = [c_int]
    lib.twa_path_name.restype = ctypes.c_char_p


@functools.cache
def available(lib: ctypes.CDLL) -> list[str]:
    """The paths compiled into ``lib`` that this CPU can run."""
    return [
        lib.twa_path_name(i).decode()
        for i in range(lib.twa_num_paths())
        if lib.twa_path_available(i)
    ]


# ----------------------------------------------------------------------------- choosing a path


def _bench_matrix(bits: int) -> tuple[PackedMatrix, torch.Tensor, torch.Tensor]:
    """16 rows x 98304 columns in blocks of 96k, 1k and 1.3k (0.2 to 1.6 MB of codes: in cache,
    so the loops are compared, not the memory), random data."""
    from twa_ray.core.layout import Blocks
    from twa_ray.core.quant import quantize

    gen = torch.Generator().manual_seed(0)
    blocks = Blocks((0, 96_000, 97_000, 98_304), ("a", "b", "c"))
    pm = quantize(torch.randn(16, blocks.numel, generator=gen), blocks, bits)
    return pm, torch.randn(blocks.numel, generator=gen), torch.randn(16, 3, generator=gen)


def measure(lib: ctypes.CDLL, paths: list[str], rounds: int = 7) -> dict[str, float]:
    """Microseconds of project + reconstruct, summed over the bit widths 1, 2, 4, 8, per path:
    one thread, the fastest of ``rounds`` rounds, the paths interleaved in every round so that
    load on a shared machine hits all of them alike."""
    cases = [_bench_matrix(bits) for bits in (1, 2, 4, 8)]
    best = {p: [float("inf")] * len(cases) for p in paths}
    for _ in range(rounds):
        for p in paths:
            index = PATHS.index(p)
            for c, (pm, g, alpha) in enumerate(cases):
                a, theta = torch.empty(pm.num_rows, pm.num_blocks), torch.empty(pm.numel)
                t0 = time.perf_counter()
                _call_project(lib, index, pm, g, a, 1)
                _call_reconstruct(lib, index, pm, alpha, None, theta, 1)
                best[p][c] = min(best[p][c], (time.perf_counter() - t0) * 1e6)
    return {p: sum(v) for p, v in best.items()}


def _choice_file(lib: ctypes.CDLL) -> Path:
    return Path(str(lib._name)).with_suffix(".choice.json")


@functools.cache
def _measured_choice(lib: ctypes.CDLL) -> dict[str, Any]:
    """The fastest path of ``lib`` on this CPU: read from the file next to the library, or
    measured now and written there."""
    file = _choice_file(lib)
    paths = available(lib)
    try:
        saved = json.loads(file.read_text())
        if saved.get("path") in paths:
            return {**saved, "chosen_by": "measured when built"}
    except (OSError, ValueError):
        pass
    timings = measure(lib, paths)
    winner = min(timings, key=timings.__getitem__)
    record = {"path": winner, "timings_us": timings, "cpu": cpu_model()}
    try:
        with atomic_path(file) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=1))
    except OSError as e:
        log.debug("cannot record the kernel choice in %s: %s", file, e)
    log.debug("packed kernels: measured %s, chose %s", timings, winner)
    return {**record, "chosen_by": "measured now"}


def choose(lib: ctypes.CDLL) -> tuple[str, str]:
    """``(path, how)``: ``$TWA_RAY_KERNEL_PATH`` when set, else the measured fastest path."""
    forced = os.environ.get(ENV_PATH, "").strip().lower()
    if forced:
        if forced not in available(lib):
            raise ValueError(
                f"{ENV_PATH}={forced} cannot run here (this CPU and build run: "
                f"{', '.join(available(lib))}); unset it or choose one of those"
            )
        return forced, ENV_PATH
    choice = _measured_choice(lib)
    return choice["path"], choice["chosen_by"]


def path_index(lib: ctypes.CDLL) -> int:
    """Index in :data:`PATHS` of the path the kernels run now."""
    return PATHS.index(choose(lib)[0])


def kernel_info() -> dict[str, Any]:
    """What the CPU kernels run here, for logs, benchmarks and ``metrics.json``:
    ``path`` (``"torch"`` without a compiled library), ``chosen_by``, ``available`` paths,
    ``timings_us`` of the measurement (when measured), ``threads``, ``cpu`` model and
    ``library`` file."""
    info: dict[str, Any] = {"threads": torch.get_num_threads(), "cpu": cpu_model()}
    lib = load()
    if lib is None:
        return {**info, "path": "torch", "chosen_by": "no compiled kernel", "available": []}
    path, how = choose(lib)
    info.update(path=path, chosen_by=how, available=available(lib), library=str(lib._name))
    if how != ENV_PATH:
        info["timings_us"] = _measured_choice(lib)["timings_us"]
    return info


# ----------------------------------------------------------------------------- calls


@functools.lru_cache(maxsize=256)
def _offsets(bounds: tuple[int, ...]) -> ctypes.Array:
    return (ctypes.c_int64 * len(bounds))(*bounds)


def _check(rc: int) -> None:
    if rc == -2:
        raise RuntimeError("the chosen packed-kernel path cannot run on this CPU")
    if rc != 0:
        raise MemoryError("the packed kernel could not allocate its work buffers")


def _call_project(
    lib: ctypes.CDLL, path: int, pm: PackedMatrix, g: torch.Tensor, out: torch.Tensor, threads: int
) -> None:
    scale, zero = pm.scale.contiguous(), pm.zero.contiguous()
    rc = lib.twa_project(
        path,
        pm.bits,
        pm.num_rows,
        pm.num_blocks,
        pm.data.data_ptr(),
        pm.data.stride(0),
        _offsets(pm.bounds),
        _offsets(pm.byte_bounds),
        scale.data_ptr(),
        zero.data_ptr(),
        g.data_ptr(),
        out.data_ptr(),
        threads,
    )
    _check(rc)


def _call_reconstruct(
    lib: ctypes.CDLL,
    path: int,
    pm: PackedMatrix,
    alpha: torch.Tensor,
    origin: torch.Tensor | None,
    out: torch.Tensor,
    threads: int,
) -> None:
    scale, zero = pm.scale.contiguous(), pm.zero.contiguous()
    rc = lib.twa_reconstruct(
        path,
        pm.bits,
        pm.num_rows,
        pm.num_blocks,
        pm.data.data_ptr(),
        pm.data.stride(0),
        _offsets(pm.bounds),
        _offsets(pm.byte_bounds),
        scale.data_ptr(),
        zero.data_ptr(),
        alpha.data_ptr(),
        None if origin is None else origin.data_ptr(),
        out.data_ptr(),
        threads,
    )
    _check(rc)


def project_(lib: ctypes.CDLL, pm: PackedMatrix, g: torch.Tensor, out: torch.Tensor) -> None:
    """``out (R, L) = project(pm, g)``; all tensors CPU float32 contiguous (``pm.data`` strided
    rows ok); the chosen path, ``torch.get_num_threads()`` threads."""
    _call_project(lib, path_index(lib), pm, g, out, torch.get_num_threads())


def reconstruct_(
    lib: ctypes.CDLL,
    pm: PackedMatrix,
    alpha: torch.Tensor,
    origin: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``out (D,) = reconstruct(pm, alpha, origin)``; ``origin`` may be ``out`` itself."""
    _call_reconstruct(lib, path_index(lib), pm, alpha, origin, out, torch.get_num_threads())

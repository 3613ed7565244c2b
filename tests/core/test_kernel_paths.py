"""The CPU kernel library: path choice by measurement, forced paths, kernel_info, and its thread
pool (same results for any thread count, concurrent callers, fork)."""

from __future__ import annotations

import multiprocessing
import shutil
import threading
from pathlib import Path

import pytest
import torch
from packed_reference import blocks_of

from twa_ray.core.kernels import cpu
from twa_ray.core.project import project, reconstruct
from twa_ray.core.quant import quantize

SIZES = (5, 4096 * 3 + 17, 300, 1, 64)


@pytest.fixture(scope="module")
def lib():
    lib = cpu.load()
    if lib is None:
        pytest.skip("no C compiler")
    return lib


def _case(bits: int = 4, rows: int = 9):
    gen = torch.Generator().manual_seed(3)
    blocks = blocks_of(*SIZES)
    pm = quantize(torch.randn(rows, blocks.numel, generator=gen), blocks, bits)
    g = torch.randn(blocks.numel, generator=gen)
    alpha = torch.randn(rows, len(SIZES), generator=gen)
    origin = torch.randn(blocks.numel, generator=gen)
    return pm, g, alpha, origin


def test_the_choice_is_measured_once_and_recorded_next_to_the_library(lib, tmp_path, monkeypatch):
    monkeypatch.setenv("TWA_RAY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cpu.ENV_PATH, raising=False)
    # this module's library, copied where an empty cache looks for it: found there, not compiled
    # again, and no choice recorded beside it yet
    shutil.copyfile(lib._name, cpu.library_file(cpu._OPT, cpu._compiler()))
    lib = cpu.build()
    assert lib is not None and Path(lib._name).parent == tmp_path
    path, how = cpu.choose(lib)
    assert how == "measured now" and path in cpu.available(lib)
    recorded = cpu._choice_file(lib)
    assert recorded.exists()
    cpu._measured_choice.cache_clear()  # a new process: reads the record, measures nothing
    assert cpu.choose(lib) == (path, "measured when built")
    timings = cpu._measured_choice(lib)["timings_us"]
    assert set(timings) == set(cpu.available(lib)) and min(timings, key=timings.get) == path


def test_the_environment_variable_forces_a_path_and_rejects_unknown_ones(lib, monkeypatch):
    monkeypatch.setenv(cpu.ENV_PATH, "portable")
    assert cpu.choose(lib) == ("portable", cpu.ENV_PATH)
    info = cpu.kernel_info()
    assert info["path"] == "portable" and info["chosen_by"] == cpu.ENV_PATH
    monkeypatch.setenv(cpu.ENV_PATH, "sse9")
    with pytest.raises(ValueError, match="TWA_RAY_KERNEL_PATH=sse9 cannot run here"):
        cpu.choose(lib)


def test_kernel_info_names_path_threads_and_cpu(lib, monkeypatch):
    monkeypatch.delenv(cpu.ENV_PATH, raising=False)
    info = cpu.kernel_info()
    assert info["path"] in info["available"] and "portable" in info["available"]
    assert info["threads"] == torch.get_num_threads() and info["cpu"]
    assert info["chosen_by"].startswith("measured") and info["path"] in info["timings_us"]


def test_a_path_this_cpu_lacks_is_refused_by_the_library(lib):
    """The library checks the CPU itself: a path index it cannot run returns an error code."""
    pm, g, _, _ = _case()
    out = torch.empty(pm.num_rows, pm.num_blocks)
    with pytest.raises(RuntimeError, match="cannot run on this CPU"):
        cpu._call_project(lib, len(cpu.PATHS), pm, g, out, 1)  # no such path


@pytest.mark.parametrize("bits", (1, 4, 8))
def test_any_thread_count_gives_the_same_bits(lib, bits):
    """Tiles are independent and summed in a fixed order: threads change nothing."""
    pm, g, alpha, origin = _case(bits)
    for name in cpu.available(lib):
        i = cpu.PATHS.index(name)
        results = []
        for threads in (1, 2, 3, 16):
            a, theta = torch.empty(pm.num_rows, pm.num_blocks), torch.empty(pm.numel)
            cpu._call_project(lib, i, pm, g, a, threads)
            cpu._call_reconstruct(lib, i, pm, alpha, origin, theta, threads)
            results.append((a, theta))
        for a, theta in results[1:]:
            assert torch.equal(a, results[0][0]) and torch.equal(theta, results[0][1]), name


def test_concurrent_callers_get_their_own_results(lib):
    """Python threads calling at once (one gets the pool, the others run on their own thread)."""
    cases = [_case(bits) for bits in (1, 2, 4, 8)]
    expect = [(project(pm, g), reconstruct(pm, alpha, origin)) for pm, g, alpha, origin in cases]
    got: dict[int, list] = {}

    def work(i: int) -> None:
        pm, g, alpha, origin = cases[i % 4]
        got[i] = [(project(pm, g), reconstruct(pm, alpha, origin)) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in got.items():
        for a, theta in runs:
            assert torch.equal(a, expect[i % 4][0]) and torch.equal(theta, expect[i % 4][1])
    assert len(got) == 8


def _child(lib, case, queue) -> None:
    pm, g, alpha, origin = case
    torch.set_num_threads(1)  # torch's own OpenMP pool does not survive fork(); ours must
    index = cpu.path_index(lib)
    a, theta = torch.empty(pm.num_rows, pm.num_blocks), torch.empty(pm.numel)
    cpu._call_project(lib, index, pm, g, a, 2)
    cpu._call_reconstruct(lib, index, pm, alpha, origin, theta, 2)
    queue.put((a.tolist(), theta.tolist()))  # plain lists: no shared-memory handles


def test_a_forked_child_can_use_the_kernels(lib):
    """Pool threads do not survive fork(): the child starts its own (no deadlock)."""
    case = _case()
    pm, g, alpha, origin = case
    index = cpu.path_index(lib)
    a, theta = torch.empty(pm.num_rows, pm.num_blocks), torch.empty(pm.numel)
    cpu._call_project(lib, index, pm, g, a, 2)  # the parent's pool threads are running
    cpu._call_reconstruct(lib, index, pm, alpha, origin, theta, 2)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(lib, case, queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got == (a.tolist(), theta.tolist())

"""What several test modules share: the checkout's root, ``twa-ray`` as a subprocess, free ports,
one torch thread, a small store of real candidates.

Import as ``from helpers import ...``: tests/ is on ``sys.path`` under pytest's default (prepend)
import mode, as tests/conftest.py lies there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli_argv(*argv: str) -> list[str]:
    """``twa-ray ARGV`` as this interpreter runs it (no console script needed)."""
    return [sys.executable, "-m", "twa_ray.cli", *argv]


def cli_env(*extra_path: str | Path, **variables: str) -> dict[str, str]:
    """This environment with the checkout (and ``extra_path``) first on ``PYTHONPATH``: a
    subprocess imports this tree's twa_ray, as a user's checkout would."""
    paths = [*map(str, extra_path), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **variables}


def run_cli(
    argv: Sequence[str], *, cwd: str | Path | None = None, env=None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``twa-ray ARGV`` in a subprocess (``cli_env()`` unless ``env`` is given), output captured
    as text."""
    return subprocess.run(
        cli_argv(*argv),
        cwd=cwd,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_ports(n: int) -> list[int]:
    """n distinct ports free on this machine now (held open together so they differ); closed
    again on return, so nothing answers there."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A port free on this machine now, where nothing answers."""
    return free_ports(1)[0]


def spawn_gloo(fn: Callable[..., None], world: int, folder: str | Path, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo group.

    The group meets through a file in ``folder`` (no TCP store owned by rank 0, no port to race
    for) and leaves through a barrier: no rank exits while a peer still talks to it (a rank that
    left early aborted its peer, ``terminate called without an active exception``). The abort
    came back once in a `.ci/run` with the barrier in place, so a rank that finished now leaves with
    ``os._exit(0)``: nothing of torch's is destroyed during the interpreter's finalization, and a
    rank that aborts prints every thread's Python stack (faulthandler). A rank left waiting
    fails after 120 s, never hangs the test.
    """
    import torch.multiprocessing as mp

    rendezvous = os.path.join(tempfile.mkdtemp(prefix="gloo-", dir=folder), "rendezvous")
    mp.spawn(_gloo_rank, args=(fn, world, rendezvous, args), nprocs=world, join=True)


def _gloo_rank(rank: int, fn: Callable[..., None], world: int, rendezvous: str, args) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread for the module that imports this fixture: small tensors gain nothing from
    two, and on a busy 2-core machine OpenMP barriers between oversubscribed threads make each
    op several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def store_data(root: Path, num_samples: int, val_frac: float = 0.1):
    """The ``DataConfig`` of ``make_store(root, num_samples=..., val_frac=...)``: MNIST-1D cached
    under ``root/cache``, the MLP."""
    from twa_ray.config import DataConfig

    return DataConfig(
        dataset="mnist1d",
        num_samples=num_samples,
        val_frac=val_frac,
        model="mlp",
        data_root=str(root / "cache"),
    )


def make_store(root: Path, *, num_samples=1200, val_frac=0.1, epochs=6, seed=0):
    """Train the MNIST-1D MLP with plain SGD under ``root``; one candidate per epoch in
    ``root/store``. Returns (store, layout)."""
    import torch
    import torch.nn.functional as F

    from twa_ray.core.layout import Layout
    from twa_ray.data import load_dataset
    from twa_ray.models import build_model
    from twa_ray.store.store import CandidateStore

    splits = load_dataset(
        "mnist1d", root=str(root / "cache"), num_samples=num_samples, val_frac=val_frac, seed=seed
    )
    torch.manual_seed(seed)
    model = build_model("mlp", num_classes=splits.num_classes, input_shape=splits.input_shape)
    layout = Layout.from_module(model)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    store = CandidateStore(str(root / "store"), create=True)
    step = 0
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
        store.write(
            dict(model.named_parameters()), layout, step=step, epoch=epoch + 1, source="test"
        )
    return store, layout


class TorchWatch:
    """While open: every 0.1 s, each process below this one (a Ray it started: the raylet's
    workers) whose title (``/proc/<pid>/cmdline``) starts with ``title``, and whether it has
    libtorch mapped: ``seen`` maps pid -> ever mapped (Linux). Another xdist worker's processes
    are not below this one."""

    def __init__(self, title: bytes) -> None:
        self.title = title
        self.seen: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _below_me(pid: int) -> bool:
        for _ in range(8):
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
        return False

    def _watch(self) -> None:
        while not self._stop.is_set():
            for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if not f.read().startswith(self.title) or not self._below_me(pid):
                            continue
                    with open(f"/proc/{pid}/maps") as f:
                        mapped = "libtorch" in f.read()
                except OSError:  # gone meanwhile
                    continue
                self.seen[pid] = self.seen.get(pid, False) or mapped
            self._stop.wait(0.1)

    def __enter__(self) -> TorchWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

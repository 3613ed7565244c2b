"""A model that does not fit one worker's memory limit: ``twa-ray run`` with DDP is OOM-killed, with
``--strategy fsdp`` it runs to the end (results: bench/RESULTS.md, "Sharded models").

    python bench/fsdp_limit.py                   # 2 workers, 4 x 4096 MLP, limit 3500 MiB; writes bench/fsdp_limit.json
    python bench/fsdp_limit.py --limit-mib 0     # no limit: each path's per-worker peak (to size one)
    python bench/fsdp_limit.py --smoke-test      # tiny model, no limit (seconds)

The real CLI on a local Ray (a subprocess per strategy, tiny MNIST-1D data, a few steps), the
model ``fsdp_limit:wide_mlp`` (``Flatten -> [Linear -> BN -> ReLU] x layers -> Linear`` of width
``--hidden``). A watcher thread puts every Ray Train worker process (``ray::RayTrainWorker``) into
its own cgroup-v1 memory cgroup (``/sys/fs/cgroup/memory/twa_limit_<strategy>_<pid>``) with ``memory.limit_in_bytes`` = the limit, as soon as the process takes that title (before it
builds the model), and reads per worker the peak RSS (``VmHWM``), the cgroup's peak usage
(``memory.max_usage_in_bytes``: page cache of the candidate writes included) and its OOM kills.
Needs root and a writable cgroup-v1 memory controller.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import ROOT, cpu_model, markdown_table, twa_ray_cli, write_json

MiB = 1 << 20
CGROUP = Path("/sys/fs/cgroup/memory")
TITLE = b"ray::RayTrainWorker"


def wide_mlp(num_classes: int, input_shape: tuple[int, ...]) -> Any:
    """The bench's model (``--model fsdp_limit:wide_mlp``): the package's MLP with
    ``TWA_LIMIT_LAYERS`` hidden layers of width ``TWA_LIMIT_HIDDEN`` (environment: the workers
    build it too)."""
    import math

    from twa_ray.models.mlp import MLP

    hidden = int(os.environ["TWA_LIMIT_HIDDEN"])
    layers = int(os.environ["TWA_LIMIT_LAYERS"])
    return MLP(math.prod(input_shape), num_classes, hidden=[hidden] * layers)


class Watcher:
    """Every Ray Train worker process into its own memory cgroup of ``limit`` bytes (0: no
    limit, accounting only); per worker the last ``VmHWM`` seen and the cgroup's readings."""

    def __init__(self, limit: int, tag: str, root: int) -> None:
        self.limit, self.tag, self.root = limit, tag, root
        self.workers: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if pid not in self.workers and cmd.startswith(TITLE) and self._ours(pid):
                        self._adopt(pid)
                    if pid in self.workers:
                        w = self.workers[pid]
                        w["hwm"] = max(w["hwm"], _vm_hwm(pid))  # 0 once it is a zombie
                except (FileNotFoundError, ProcessLookupError):
                    continue

    def _ours(self, pid: int) -> bool:
        """Whether ``pid`` descends from the watched command (its Ray's raylet): other Ray
        clusters on the machine are left alone."""
        for _ in range(8):
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if pid == self.root:
                return True
            if pid <= 1:
                return False
        return False

    def _adopt(self, pid: int) -> None:
        group = CGROUP / f"twa_limit_{self.tag}_{pid}"
        group.mkdir(exist_ok=True)
        try:  # the charges of what it allocated before (deprecated: not on every kernel)
            (group / "memory.move_charge_at_immigrate").write_text("3")
        except OSError:
            pass
        if self.limit:
            (group / "memory.limit_in_bytes").write_text(str(self.limit))
        (group / "cgroup.procs").write_text(str(pid))
        self.workers[pid] = {"pid": pid, "group": group, "hwm": _vm_hwm(pid)}

    def stop(self) -> list[dict[str, Any]]:
        """Stop watching; each worker's readings (its cgroup removed)."""
        self._stop.set()
        self._thread.join()
        out = []
        for w in self.workers.values():
            group = w.pop("group")
            oom = dict(
                line.split() for line in (group / "memory.oom_control").read_text().splitlines()
            )
            w["cgroup_peak"] = int((group / "memory.max_usage_in_bytes").read_text())
            w["oom_kills"] = int(oom.get("oom_kill", 0))
            for _ in range(50):  # empty once the process is gone
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
            out.append(w)
        return out


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(strategy: str, args: argparse.Namespace, limit: int) -> dict[str, Any]:
    """``twa-ray run --strategy <strategy>`` under ``limit``; its outcome and the workers'."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            *twa_ray_cli("run"),
            *["--model", "fsdp_limit:wide_mlp", "--strategy", strategy, "--out", f"{tmp}/out"],
            *["--workers", str(args.workers), "--num-samples", str(args.samples)],
            *["--epochs", "2", "--sample-frac", "0.5", "--batch-size", str(args.batch)],
            *["--interval-unit", "step", "--sample-interval", str(args.interval)],
            *["--mode", "v", "--twa-epochs", "1", "--no-greedy-soup"],
            *["--max-failures", "0", "--checkpoint-interval", "0", "--connect-timeout", "300"],
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")]
            ),
            "TWA_LIMIT_HIDDEN": str(args.hidden),
            "TWA_LIMIT_LAYERS": str(args.layers),
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
        }
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        watcher = Watcher(limit, strategy, proc.pid)
        output = proc.communicate()[0].decode(errors="replace")
        wall = time.perf_counter() - t0
        workers = watcher.stop()
        metrics = Path(f"{tmp}/out/metrics.json")
        done = proc.returncode == 0 and metrics.exists()
        twa_v = json.loads(metrics.read_text())["methods"]["twa_v"] if done else None
    tail = output.strip().splitlines()[-3:]
    hwm = max((w["hwm"] for w in workers), default=0)
    kills = sum(w["oom_kills"] for w in workers)
    print(
        f"{strategy}: rc {proc.returncode}, {len(workers)} workers, peak RSS {hwm / MiB:.0f} MiB, "
        f"OOM kills {kills}, {wall:.0f} s",
        flush=True,
    )
    if not done:
        print("  " + "\n  ".join(tail), flush=True)
    return {
        "strategy": strategy,
        "rc": proc.returncode,
        "finished": done,
        "wall_s": wall,
        "peak_rss": hwm,
        "oom_kills": kills,
        "workers": workers,
        "twa_v": twa_v,
        "tail": tail,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny model, no limit")
    parser.add_argument("--hidden", type=int, default=4096, help="width of the hidden layers")
    parser.add_argument("--layers", type=int, default=4, help="hidden layers")
    parser.add_argument("--limit-mib", type=int, default=3500, help="per worker (0: none)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (W)")
    parser.add_argument("--samples", type=int, default=600, help="MNIST-1D examples")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--interval", type=int, default=4, help="steps between candidates")
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.hidden, args.layers, args.limit_mib, args.out = 64, 2, 0, os.devnull
    limit = args.limit_mib * MiB
    params = 40 * args.hidden + (args.layers - 1) * args.hidden**2 + 10 * (args.hidden + 1)
    results = [run(s, args, limit) for s in args.strategies]
    print(
        f"MLP {args.layers} x {args.hidden} hidden (D ~ {params:,}, {4 * params / MiB:.0f} MiB "
        f"float32), W = {args.workers}, limit {args.limit_mib or 'none'} MiB per worker; "
        f"CPU: {cpu_model()}"
    )
    header = ["strategy", "finished", "exit", "OOM kills", "peak RSS / worker", "cgroup peak", "s"]
    rows = [
        [
            r["strategy"],
            "yes" if r["finished"] else "no",
            r["rc"],
            r["oom_kills"],
            f"{r['peak_rss'] / MiB:.0f}",
            f"{max((w['cgroup_peak'] for w in r['workers']), default=0) / MiB:.0f}",
            f"{r['wall_s']:.0f}",
        ]
        for r in results
    ]
    print("\n".join(markdown_table(header, rows)))
    write_json(
        args.out, {"cpu": cpu_model(), "args": vars(args), "params": params, "results": results}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

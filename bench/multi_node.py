"""The smoke run on one worker node vs three, on the test cluster of tests/cluster (a head with
no CPUs + 3 worker nodes of 1 CPU, each in its own mount namespace; moto's S3 as the storage).

    python bench/multi_node.py          # ~8 min on 2 cores; needs root (unshare)

Measures, per run: the job's wall time (`ray job submit` -> SUCCEEDED), the bytes it left in the
bucket by folder (candidates, Ray Train checkpoints, outputs), and, for a basis B put once and
read by two coefficient-style workers on each of two nodes, the object-store bytes per node
(raylet store stats). On this box the nodes share 2 cores: "3 nodes" measures the overhead of
spreading, not a speed-up. Writes bench/multi_node.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from _common import ROOT, cpu_model, markdown_table, write_json

sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]

from harness import start_cluster, start_s3, stop_cluster, submit  # noqa: E402

RUN = ["python", "jobs/run_twa.py", "--smoke-test", "--epochs", "40"]


def _bytes_by_folder(s3, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for path, size in s3.list(prefix).items():
        top = "/".join(path.split("/")[:2]) if path.startswith("work/") else path.split("/")[0]
        out[top] = out.get(top, 0) + size
    out["total"] = sum(s3.list(prefix).values())
    return out


def _object_store_per_node(cluster) -> dict[str, int]:
    """B (8 candidates x 2^20 parameters, 8 bits) + origin put once; 2 readers on node0 and 2 on
    node1: bytes used per node's object store, before -> after."""
    import ray
    import torch
    from ray._private.internal_api import node_stats

    from twa_ray.core.layout import Layout
    from twa_ray.core.twa import TWAConfig
    from twa_ray.ray.shards import put_subspace
    from twa_ray.store import CandidateStore

    def used() -> dict[str, int]:
        out = {}
        for n in ray.nodes():
            if n["Alive"]:
                name = next(
                    (r for r in n["Resources"] if r.startswith("node") and r[4:].isdigit()), "head"
                )
                st = node_stats(
                    n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False
                )
                out[name] = int(st.store_stats.object_store_bytes_used)
        return out

    ray.init(address=cluster.gcs_address, log_to_driver=False)
    try:
        model = torch.nn.Linear(1024, 1024, bias=False)
        layout = Layout.from_module(model)
        with tempfile.TemporaryDirectory() as tmp:
            store = CandidateStore(tmp, create=True)
            for k in range(8):
                torch.nn.init.normal_(model.weight)
                store.write(model.state_dict(), layout, step=k + 1)
            sharded = put_subspace(store, layout, TWAConfig(bits=8))
        before = used()

        @ray.remote(num_cpus=0)
        class Reader:
            def __init__(self, sharded):
                self.view = sharded.materialize()

            def ready(self) -> bool:
                return True

        readers = [
            Reader.options(resources={f"node{i}": 0.01}).remote(sharded) for i in (0, 0, 1, 1)
        ]
        ray.get([r.ready.remote() for r in readers])
        after = used()
        res = {k: after[k] - before.get(k, 0) for k in sorted(after)}
        res["B_plus_origin"] = sharded.nbytes + layout.numel * 4
        return res
    finally:
        ray.shutdown()


def _table_row(r: dict) -> list:
    """One run's row: wall times and the bytes it left in the bucket, by folder."""
    b = r["bytes_in_storage"]
    train = sum(v for k, v in b.items() if k.startswith("work/"))
    cells = [r["run"], r["job_wall_s"], r["run_wall_s"], b["total"], b.get("candidates", 0)]
    return [*cells, train, b.get("outputs", 0)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "multi_node.json"))
    args = p.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    s3 = start_s3()
    run_root = Path(tempfile.mkdtemp(prefix="twa-bench-"))
    cluster = start_cluster(3, env=s3.env, hide=[run_root])
    rows = []
    try:
        for label, extra in (
            ("1 node (3 workers x 0.33 CPU)", ["--workers", "3", "--cpus-per-worker", "0.33"]),
            ("3 nodes (3 workers x 1 CPU)", ["--workers", "3"]),
        ):
            prefix = "one" if label.startswith("1") else "three"
            res = submit(
                cluster,
                [*RUN, *extra, "--storage", s3.uri(prefix), "--out", str(run_root / prefix)],
                working_dir=ROOT,
            )
            if res.status != "SUCCEEDED":
                print(res.logs[-4000:])
                return 1
            metrics = json.loads((run_root / prefix / "metrics.json").read_text())
            rows.append(
                {
                    "run": label,
                    "job_wall_s": round(res.wall_s, 1),
                    "run_wall_s": metrics["wall_time_s"],
                    "bytes_in_storage": _bytes_by_folder(s3, prefix),
                }
            )
        store_bytes = _object_store_per_node(cluster)
    finally:
        stop_cluster(cluster)
        s3.stop()
    result = {"cpu": cpu_model(), "runs": rows, "object_store_bytes_per_node": store_bytes}
    write_json(args.out, result)
    print(f"CPU: {result['cpu']}")
    header = [
        *("run", "job wall s", "run wall s", "bytes in storage (total)"),
        *("candidates", "ray_train", "outputs"),
    ]
    print("\n".join(markdown_table(header, map(_table_row, rows))))
    print("object-store bytes per node (B put once, 2 readers on node0 and on node1):", store_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

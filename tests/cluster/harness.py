"""A Ray cluster that behaves like several machines, on this one box, and an S3 server.

    s3 = start_s3()                                  # moto's server on 127.0.0.1, one bucket
    cluster = start_cluster(3, env=s3.env, hide=[run_root])
    ... ray job submit / twa-ray --address cluster.address ...
    cluster.kill_node(1)                             # SIGKILL every process of that node
    stop_cluster(cluster); s3.stop()

- The head (``ray start --head --num-cpus 0``) holds the GCS, the dashboard, the job server and
  the drivers; it sees the machine's filesystem.
- Each worker node runs ``ray start --address HEAD --block`` inside its own mount namespace
  (``unshare --mount --propagation private``) with a private tmpfs over Ray's temp dir (the
  head's ``--temp-dir``, which the nodes take from the GCS; it is also their ``TMPDIR``) and
  over every folder in ``hide`` (the tests' run folders): nothing a worker node writes there is
  visible to the head or to another node, exactly as on separate machines. Only the S3 server
  is shared. The rest of the filesystem stays visible, as a machine image would be: the
  checkout and its virtual environment work wherever they lie (``/tmp`` included).
- Each node gets its own ports (node manager, object manager, dashboard agent HTTP + gRPC,
  metrics export, runtime-env agent). Token auth is off (a throwaway cluster on localhost).
- Nodes are stopped by the process ids started here (every process in a node's mount namespace
  is found through ``/proc/<pid>/ns/mnt``), never with ``ray stop``.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    from ray_cluster import Head, client_env, free_ports, http_get, start_head, stop_head
except ImportError:
    from tests.ray_cluster import Head, client_env, free_ports, http_get, start_head, stop_head

from twa_ray.connect import IDLE_WORKER_MS

RAY_CLI = (sys.executable, "-m", "ray.scripts.scripts")
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def can_unshare() -> str | None:
    """None when this process may build private mount namespaces, else the reason it may not."""
    try:
        r = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "mount",
                "-t",
                "tmpfs",
                "tmpfs",
                "/mnt",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare unavailable: {e}"
    if r.returncode != 0:
        return f"unshare --mount refused (needs root or CAP_SYS_ADMIN): {r.stderr.strip()[:200]}"
    return None


# --------------------------------------------------------------------------- S3


@dataclass
class S3:
    server: object
    port: int
    bucket: str
    env: dict[str, str]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, prefix: str) -> str:
        """A pyarrow URI of ``bucket/prefix`` on this server."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            endpoint_override=self.endpoint,
            scheme="http",
        )

    def list(self, prefix: str) -> dict[str, int]:
        """``path -> size`` of every object under ``bucket/prefix`` (paths relative to it)."""
        import pyarrow.fs as pafs

        root = f"{self.bucket}/{prefix}"
        sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        return {
            i.path[len(root) + 1 :]: i.size
            for i in self.fs().get_file_info(sel)
            if i.type == pafs.FileType.File
        }

    def stop(self) -> None:
        self.server.stop()  # type: ignore[attr-defined]


def start_s3(bucket: str = "twa") -> S3:
    """moto's S3 server on 127.0.0.1 (a free port) with one empty bucket."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(S3_ENV)  # this process (the tests) is a client too
    pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
    ).create_dir(bucket)
    return S3(server, port, bucket, dict(S3_ENV))


# --------------------------------------------------------------------------- the cluster


@dataclass
class Node:
    index: int
    proc: subprocess.Popen  # `unshare ... ray start --block` (leader of its own session)
    log_path: Path
    mnt_ns: str = ""  # the node's mount namespace (readlink /proc/<pid>/ns/mnt)
    killed: bool = False

    def pids(self) -> list[int]:
        """Every process in this node's mount namespace (raylet, agents, Ray workers)."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{d}/ns/mnt") == self.mnt_ns:
                    out.append(int(d))
            except OSError:
                continue
        return out


@dataclass
class Cluster:
    head: Head
    nodes: list[Node]
    env: dict[str, str]  # environment for clients (drivers, `ray job`, twa-ray)
    gcs_address: str
    hidden: list[str] = field(default_factory=list)
    cpus_per_node: float = 1
    object_store_mb: int = 256

    @property
    def dashboard_url(self) -> str:
        return self.head.dashboard_url

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process of worker node ``index`` (as if the machine died)."""
        node = self.nodes[index]
        pids = node.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.killed = True
        node.proc.wait(timeout=30)
        return pids

    def revive(self, timeout_s: float = 240.0) -> None:
        """Start a fresh node in place of every killed one (a replacement machine: empty disk,
        same index and ``node<i>`` resource), and wait until all are alive."""
        dead = [n.index for n in self.nodes if n.killed]
        if not dead:
            return
        before = _alive_nodes(self) or set()  # may still list a killed node as alive
        for i in dead:
            self.nodes[i] = _start_node(self, i)
        _wait_nodes(self, len(dead), timeout_s, new_since=before)


def _node_ip() -> str:
    import ray._private.services as services

    return services.get_node_ip_address()


def _alive_nodes(cluster: Cluster) -> set[str] | None:
    """The node ids that the GCS lists alive (head included), None while it does not answer."""
    code, body = http_get(f"{cluster.dashboard_url}/nodes?view=summary", None)
    if code != 200:
        return None
    summary = json.loads(body)["data"]["summary"]
    return {s["raylet"]["nodeId"] for s in summary if s["raylet"]["state"] == "ALIVE"}


def _wait_nodes(
    cluster: Cluster,
    n: int,
    timeout_s: float,
    *,
    new_since: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Until the GCS lists ``n`` alive nodes (head included) not in ``new_since``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"worker node {node.index} exited with {node.proc.returncode}:\n"
                    + node.log_path.read_text(errors="replace")[-3000:]
                )
        alive = _alive_nodes(cluster)
        if alive is not None and len(alive - new_since) >= n:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{n} nodes not alive after {timeout_s:.0f} s")


def start_cluster(
    num_nodes: int = 3,
    *,
    env: Mapping[str, str] | None = None,
    hide: Sequence[str | os.PathLike[str]] = (),
    cpus_per_node: float = 1,
    object_store_mb: int = 256,
    timeout_s: float = 240.0,
) -> Cluster:
    """A head with ``--num-cpus 0`` and ``num_nodes`` worker nodes, each in its own mount
    namespace with a private tmpfs over Ray's temp dir and over every path in ``hide``."""
    # a loaded 2-core machine can take over a minute to start a worker group (default 60 s).
    # The GCS declares a killed node dead after health_check_failure_threshold missed checks,
    # one every health_check_period_ms (Ray's defaults: 5 x 3 s); 3 x 1 s here: a node-kill
    # run waits ~3 s, not ~15 s, before Ray Train restarts its group (the timeout of one check
    # stays Ray's 10 s: a raylet slow on a loaded machine is not taken for dead)
    extra = {
        "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        # as cluster.yaml starts its nodes: idle workers kept between streamed epochs
        "RAY_idle_worker_killing_time_threshold_ms": str(IDLE_WORKER_MS),
        **(env or {}),
    }
    head = start_head(num_cpus=0, object_store_mb=object_store_mb, auth=False, extra_env=extra)
    cluster_env = {**client_env(None), **extra}
    cluster = Cluster(
        head,
        [],
        cluster_env,
        f"{_node_ip()}:{head.gcs_port}",
        cpus_per_node=cpus_per_node,
        object_store_mb=object_store_mb,
    )
    cluster.env["RAY_ADDRESS"] = cluster.gcs_address
    try:
        # not /tmp as a whole: the checkout and its virtual environment may lie below it
        cluster.hidden = _hidden(hide, head.temp_dir)
        # one node at a time, each retried once: on a loaded 2-core machine a raylet can miss
        # its deadline to register with the GCS ("Failed to get node info ... Deadline Exceeded")
        for i in range(num_nodes):
            for attempt in range(2):
                node = _start_node(cluster, i)
                cluster.nodes.append(node)
                try:
                    _wait_nodes(cluster, i + 2, timeout_s)
                    break
                except RuntimeError:
                    cluster.nodes.pop()
                    _kill(node)
                    if attempt:
                        raise
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _hidden(hide: Sequence[str | os.PathLike[str]], ray_temp_dir: Path) -> list[str]:
    """The folders a worker node gets a private tmpfs over: Ray's temp dir and ``hide``, none
    holding this interpreter or the checkout (a node could not start its Python then)."""

    def below(path: str, folder: str) -> bool:
        return os.path.commonpath([folder, path]) == folder

    paths = sorted({os.path.abspath(h) for h in (*hide, ray_temp_dir)}, key=len)
    hidden = [h for k, h in enumerate(paths) if not any(below(h, p) for p in paths[:k])]
    needed = [sys.prefix, sys.executable, str(Path(__file__).resolve().parents[2])]
    for h in hidden:
        clash = [p for p in needed if below(os.path.abspath(p), h)]
        if clash:
            raise ValueError(f"cannot hide {h!r} from the worker nodes: it holds {clash[0]!r}")
    return hidden


def _start_node(cluster: Cluster, i: int) -> Node:
    """``unshare`` + private tmpfs mounts + ``ray start --address ... --block`` for node ``i``."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    # the node's own scratch space (Ray's and Python's), private like the rest of its temp dir
    env["TMPDIR"] = env["RAY_TMPDIR"] = str(cluster.head.temp_dir)
    hidden = cluster.hidden
    node_mgr, obj_mgr, agent_http, agent_grpc, metrics, rt_env = free_ports(6)
    mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(h)}" for h in hidden)
    ray = " ".join(
        shlex.quote(a)
        for a in [
            *RAY_CLI,
            "start",
            "--block",
            "--address",
            cluster.gcs_address,
            "--num-cpus",
            str(cluster.cpus_per_node),
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(cluster.object_store_mb << 20),
            "--node-manager-port",
            str(node_mgr),
            "--object-manager-port",
            str(obj_mgr),
            "--dashboard-agent-listen-port",
            str(agent_http),
            "--dashboard-agent-grpc-port",
            str(agent_grpc),
            "--metrics-export-port",
            str(metrics),
            "--runtime-env-agent-port",
            str(rt_env),
            "--resources",
            f'{{"node{i}": 1}}',
            "--disable-usage-stats",
        ]
    )
    log_path = cluster.head.temp_dir / f"node{i}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "bash",
                "-c",
                f"{mounts} && exec {ray}",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node = Node(i, proc, log_path)
    for _ in range(100):  # the namespace exists once unshare has exec'd bash
        try:
            ns = os.readlink(f"/proc/{proc.pid}/ns/mnt")
        except OSError:
            break
        if ns != os.readlink("/proc/self/ns/mnt"):
            node.mnt_ns = ns
            break
        time.sleep(0.05)
    return node


def _kill(node: Node) -> None:
    """SIGKILL every process of ``node`` (its namespace) and reap its `unshare`."""
    if node.mnt_ns:
        for pid in node.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if node.proc.poll() is None:
        node.proc.kill()
    node.proc.wait(timeout=30)


def stop_cluster(cluster: Cluster) -> None:
    """SIGTERM each worker node's `ray start`, then SIGKILL what is left in its namespace;
    then the head (by its process group)."""
    for node in cluster.nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for node in cluster.nodes:
        try:
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _kill(node)
    stop_head(cluster.head)


def coefficients(s3: S3, prefix: str) -> dict[str, list[float]]:
    """The alpha of each variant of the run under ``prefix`` (its coefficients.parquet in the
    bucket), ordered by row and block."""
    import pyarrow.parquet as pq

    with s3.fs().open_input_file(f"{s3.bucket}/{prefix}/outputs/coefficients.parquet") as f:
        t = pq.read_table(io.BytesIO(f.read())).to_pylist()
    out: dict[str, list[float]] = {}
    for row in sorted(t, key=lambda r: (r["variant"], r["row"], r["block"])):
        out.setdefault(row["variant"], []).append(row["alpha"])
    return out


def _cmdlines(node: Node) -> list[bytes]:
    out = []
    for pid in node.pids():
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            pass
    return out


def train_nodes(cluster: Cluster) -> set[int]:
    """Worker nodes running a Ray Train worker now (every node has the same IP here, so Ray
    Train's node_rank cannot tell them apart: ask the nodes' mount namespaces)."""
    return {
        n.index
        for n in cluster.nodes
        if not n.killed and any(b"RayTrainWorker" in c for c in _cmdlines(n))
    }


def submit(
    cluster: Cluster,
    entrypoint: Sequence[str],
    *,
    working_dir: str | os.PathLike[str],
    timeout_s: float = 600.0,
    on_poll=None,
    env_vars: Mapping[str, str] | None = None,
):
    """``ray job submit --working-dir`` (retried while the fresh head answers "No available
    agent to submit job"); ``on_poll()`` is called every half second while the job runs;
    ``env_vars``: the job's own environment variables (its runtime env: the driver and every
    Ray process of the job). Returns the :class:`ray_cluster.JobResult`."""
    try:
        from ray_cluster import JobResult, job_status, ray_cli
    except ImportError:
        from tests.ray_cluster import JobResult, job_status, ray_cli
    import uuid

    job_id = f"twa-cluster-{uuid.uuid4().hex[:10]}"
    args = [
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--submission-id",
        job_id,
        "--working-dir",
        os.fspath(working_dir),
        "--runtime-env-json",
        json.dumps({"excludes": [".git"], "env_vars": dict(env_vars or {})}),
        "--no-wait",
        "--",
        *entrypoint,
    ]
    t0 = time.monotonic()
    while True:
        proc = ray_cli(cluster.head, *args, env=cluster.env)
        if proc.returncode == 0:
            break
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() - t0 > 60:
            raise RuntimeError(f"ray job submit failed:\n{proc.stdout}\n{proc.stderr}")
        time.sleep(2.0)
    status = "PENDING"
    while time.monotonic() - t0 < timeout_s:
        status = job_status(cluster.head, job_id)
        if status == "RUNNING" and on_poll is not None:
            on_poll()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    else:
        ray_cli(
            cluster.head, "job", "stop", "--address", cluster.dashboard_url, job_id, env=cluster.env
        )
        status = "TIMEOUT"
    logs = ray_cli(
        cluster.head, "job", "logs", "--address", cluster.dashboard_url, job_id, env=cluster.env
    )
    return JobResult(job_id, status, logs.stdout + logs.stderr, time.monotonic() - t0)

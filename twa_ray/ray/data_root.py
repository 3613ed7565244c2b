"""``--data-root`` checked on every node before any worker starts: one clear error that names
the nodes that lack it, instead of a worker's failure after the group started.

Ray runs :func:`missing_root` as a task on each node, in a worker process that imports this
module: it imports neither torch nor a module that does (~1.5 s of CPU per node and command).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from twa_ray.storage import alive_nodes

if TYPE_CHECKING:
    from twa_ray.config import DataConfig

__all__ = ["check_data_root_on_nodes", "missing_root", "needs_root"]


def missing_root(root: str) -> str | None:
    """On this node: the problem with ``root``, or None."""
    if os.path.isdir(root):
        return None
    return f"--data-root {root!r} does not exist on node {socket.gethostname()} ({_node_ip()})"


def _node_ip() -> str:
    import ray

    try:
        return str(ray.util.get_node_ip_address())
    except Exception:  # outside Ray
        return "no Ray"


def needs_root(data: DataConfig) -> bool:
    """Whether every node must hold ``--data-root``: MNIST-1D is generated (its root is only a
    cache folder that it creates), a storage URI is read over the network from every node."""
    return bool(data.data_root) and data.dataset != "mnist1d" and "://" not in data.data_root


def check_data_root_on_nodes(data: DataConfig) -> None:
    """Before training: every alive node that can host a worker (it has CPUs) checks
    ``data.data_root``; raises one ``FileNotFoundError`` naming the nodes and the path."""
    if not needs_root(data):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0)(missing_root)
    refs = [
        check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(data.data_root)
        for n in alive_nodes()
        if n.get("Resources", {}).get("CPU", 0) > 0
    ]
    problems = [p for p in ray.get(refs) if p]
    if problems:
        raise FileNotFoundError(
            "; ".join(problems) + "; put the dataset at that path on every node (or on shared "
            "storage mounted at the same path), or pass another --data-root"
        )

"""One storage location for every artifact that more than one node reads: ``--storage URI``.

A local (or NFS) path, or any ``pyarrow.fs`` URI with pyarrow's query options, e.g.
``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http``. Under it a run keeps::

    run.json          the marker: the command and run id (--resume finds the run here)
    .twa-ray-lease.json  the one-writer lease, renewed while a command writes
    candidates/       the candidate store
    work/ray_train/   Ray Train's storage (sampling and coefficient checkpoints)
    work/*.json       resolved configs of the phases
    outputs/          metrics.json, model.safetensors, coefficients.parquet, config.yaml, plots

Who may write a location, and what ``--overwrite`` deletes there: :mod:`twa_ray.outdir`.

``--out`` stays a local folder with the outputs: the driver writes them there and uploads a copy
to ``outputs/`` (nothing is read back from a path that a worker wrote on its own node).

>>> st = open_storage("s3://bkt/runs/a?endpoint_override=127.0.0.1:9000&scheme=http")  # doctest: +SKIP
>>> st.join("candidates")                                                             # doctest: +SKIP
's3://bkt/runs/a/candidates?endpoint_override=127.0.0.1:9000&scheme=http'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from twa_ray.core.atomic import atomic_path
from twa_ray.redact import redact, remember, restore

__all__ = [
    "Storage",
    "open_storage",
    "filesystem_from_uri",
    "join_uri",
    "absolute",
    "check_multi_node",
    "alive_nodes",
    "job_argv",
    "connect_timeout",
]

STORAGE_ENV = "TWA_RAY_STORAGE"
"""A cluster's default ``--storage`` for the jobs (set once, in cluster.yaml)."""


def job_argv(command: str, argv: list[str]) -> list[str]:
    """A job's ``twa-ray`` arguments: ``--storage $TWA_RAY_STORAGE/<command>`` added when the
    variable is set and no ``--storage`` was given (``--out`` stays local)."""
    default = os.environ.get(STORAGE_ENV)
    if not default or any(a == "--storage" or a.startswith("--storage=") for a in argv):
        return [command, *argv]
    return [command, *argv, "--storage", join_uri(default, command, _run_name(argv))]


def _run_name(argv: list[str]) -> str:
    """The last folder name of ``--out`` (a run's name in the bucket), else ``default``."""
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return os.path.basename(os.path.normpath(argv[i + 1])) or "default"
        if a.startswith("--out="):
            return os.path.basename(os.path.normpath(a[6:])) or "default"
    return "default"


def join_uri(uri: str, *parts: str) -> str:
    """``uri/part/...`` for a local path or a URI (whose ``?query`` options stay at the end)."""
    if "://" not in uri:
        return os.path.join(uri, *parts)
    base, sep, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def absolute(path: str) -> str:
    """A local path made absolute (workers may run in another directory), or a URI as given
    (its redacted credentials restored)."""
    return restore(path) if "://" in path else os.path.abspath(path)


@dataclass(frozen=True)
class Storage:
    """A resolved storage location.

    Attributes:
        uri: the location as given (a local path made absolute, or a URI with its query).
        fs: the ``pyarrow.fs`` filesystem; ``path`` the location inside it.
        local: ``uri`` is a path on this machine's disk (or an NFS mount).
    """

    uri: str
    fs: pafs.FileSystem
    path: str
    local: bool

    def __repr__(self) -> str:
        return f"Storage({redact(self.uri)!r})"

    def join(self, *parts: str) -> str:
        """The URI of a location below this one (a URI's query options are kept)."""
        return join_uri(self.uri, *parts)

    def child(self, *parts: str) -> Storage:
        path = "/".join([self.path.rstrip("/"), *parts])
        return Storage(self.join(*parts), self.fs, path, self.local)

    def train_args(self) -> dict[str, Any]:
        """``storage_path`` / ``storage_filesystem`` for Ray Train's and Tune's ``RunConfig``
        (with a filesystem, Ray wants the path inside it, without the scheme)."""
        if self.local:
            return {"storage_path": self.path, "storage_filesystem": None}
        return {"storage_path": self.path, "storage_filesystem": self.fs}

    def _p(self, rel: str) -> str:
        return f"{self.path.rstrip('/')}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def read_json(self, rel: str) -> Any:
        """The record ``rel``, its redacted URIs made usable again (:func:`twa_ray.redact.restore`)."""
        with self.fs.open_input_stream(self._p(rel)) as f:
            return _restore_uris(json.loads(f.read().decode()))

    def write_json(self, rel: str, obj: Any) -> None:
        """Atomic: a temp file + rename on a local disk; one PUT (atomic already) on S3/GCS.
        Credentials are masked (:func:`twa_ray.redact.redact`)."""
        data = (json.dumps(redact(obj), indent=2, sort_keys=True) + "\n").encode()
        path = self._p(rel)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if not self.local:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)

    def upload(self, local_dir: str | os.PathLike[str], rel: str, names: list[str]) -> int:
        """Copy the files ``names`` of ``local_dir`` to ``rel/``; returns the bytes copied."""
        dest = self._p(rel)
        self.fs.create_dir(dest, recursive=True)
        total = 0
        for name in names:
            src = Path(local_dir) / name
            if not src.is_file():
                continue
            pafs.copy_files(
                str(src),
                f"{dest}/{name}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
            total += src.stat().st_size
        return total

    def upload_outputs(
        self, out: str | os.PathLike[str], rel: str = "outputs", *, skip: Collection[str] = ()
    ) -> int:
        """Copy the outputs in ``out`` (its top-level files, ``skip`` and hidden files aside)
        to ``rel/``; returns the bytes copied."""
        names = sorted(
            p.name
            for p in Path(out).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name not in skip
        )
        return self.upload(out, rel, names)

    def download(self, rel: str, local_dir: str | os.PathLike[str]) -> None:
        """Copy the folder ``rel`` to ``local_dir`` (created)."""
        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(
            self._p(rel),
            str(local_dir),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )

    def bytes_under(self, rel: str = "") -> int:
        """Total size of the files below ``rel`` (for the report of bytes uploaded)."""
        root = self._p(rel) if rel else self.path
        sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        return sum(i.size or 0 for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)


def _restore_uris(obj: Any) -> Any:
    if isinstance(obj, str):
        return restore(obj)
    if isinstance(obj, dict):
        return {k: _restore_uris(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_uris(v) for v in obj]
    return obj


CONNECT_TIMEOUT_ENV = "TWA_RAY_CONNECT_TIMEOUT"
"""Seconds to wait for Ray and the storage to answer (``--connect-timeout``; default 60)."""

S3_MAX_ATTEMPTS = 5
"""Tries of one S3 request: transient failures (a reset connection, 500/503, throttling) are
retried with exponential backoff (up to about 15 s in all against an endpoint that refuses)."""


def connect_timeout() -> float:
    """:data:`CONNECT_TIMEOUT_ENV`, checked: a positive number of seconds (default 60)."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "60")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(
            f"--connect-timeout / {CONNECT_TIMEOUT_ENV}={raw!r} is not a positive number of seconds; "
            "pass e.g. --connect-timeout 60"
        )
    return value


def filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``pyarrow.fs.FileSystem.from_uri`` for every URI the product opens: masked credentials
    restored (:func:`twa_ray.redact.restore`) and remembered for masking; on S3, each request
    retried (:data:`S3_MAX_ATTEMPTS`) and each connection attempt bounded by
    :func:`connect_timeout` / (attempts + 1), so an endpoint that does not answer fails within
    the connect timeout plus the backoff (a stalled request: after ``connect_timeout`` s)."""
    uri = restore(uri)
    remember(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.S3FileSystem):
        options = fs.__reduce__()[1][0]  # the options parsed from the URI
        limit = connect_timeout()
        options.update(
            connect_timeout=max(limit / (S3_MAX_ATTEMPTS + 1), 0.5),
            request_timeout=limit,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        )
        fs = pafs.S3FileSystem(**options)
    return fs, path


_S3_FAULT = re.compile(r"[^\n]*AWS Error [A-Z_]+[^\n]*")


def storage_fault(e: BaseException) -> str | None:
    """One line for a storage request that failed every retry (here or in a Ray worker, whose
    error carries the worker's traceback as text), or None when ``e`` is something else."""
    found = _S3_FAULT.search(str(e))
    if found is None:
        return None
    return (
        f"the storage failed a request {S3_MAX_ATTEMPTS} times ({redact(found.group(0).strip())}); writes "
        "are atomic, so nothing partial was kept: check the endpoint, the network and the "
        "credentials, then rerun with --resume"
    )


def open_storage(uri: str | os.PathLike[str], *, create: bool = True) -> Storage:
    """Resolve ``uri`` (a local path or a ``pyarrow.fs`` URI) and create the location.

    Raises:
        ValueError: a URI pyarrow cannot open or reach, naming it (redacted) and the fix.
    """
    uri = restore(os.fspath(uri))
    if "://" in uri and not uri.startswith("file://"):
        try:
            fs, path = filesystem_from_uri(uri)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise ValueError(
                f"--storage {redact(uri)!r}: pyarrow cannot open it ({redact(str(e))}); use a local "
                "path or a pyarrow.fs URI such as s3://bucket/prefix or gs://bucket/prefix"
            ) from None
        st = Storage(uri, fs, path.rstrip("/"), local=False)
    else:
        path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
        st = Storage(path, pafs.LocalFileSystem(), path, local=True)
    if create:
        try:
            st.fs.create_dir(st.path, recursive=True)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(
                f"--storage {redact(uri)!r} is not writable or did not answer in {S3_MAX_ATTEMPTS} tries "
                f"({redact(str(e).splitlines()[0])}); check the bucket / path, the endpoint and the "
                "credentials of this machine (--connect-timeout sets the wait)"
            ) from None
    return st


def alive_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected Ray cluster (``ray.nodes()`` entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_multi_node(paths: dict[str, str], *, shared_fs: bool) -> None:
    """Refuse local paths (``flag -> path``) on a Ray cluster of more than one node: the other
    nodes cannot see them, and Ray Train fails at its first checkpoint. ``--shared-fs`` says the
    paths are mounted on every node (NFS)."""
    local = {
        flag: p for flag, p in paths.items() if p and ("://" not in p or p.startswith("file://"))
    }
    if shared_fs or not local:
        return
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    flag, path = next(iter(local.items()))
    raise ValueError(
        f"the Ray cluster has {len(nodes)} nodes and {flag} {path!r} is a local path that the "
        "other nodes cannot see; pass --storage s3://bucket/prefix (or another pyarrow.fs URI), "
        "or --shared-fs if every node mounts that path"
    )

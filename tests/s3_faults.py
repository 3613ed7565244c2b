"""A local S3 (moto's server on 127.0.0.1) and a fault-injecting TCP proxy in front of it.

The proxy forwards bytes both ways; a connection whose client has sent more than ``after`` bytes
(a request with a body: an upload mid-transfer) is cut with a TCP reset while ``drop`` is left,
then held without forwarding (a stall, until the client gives up) while ``stall`` is left.
Everything listens on 127.0.0.1 only and every thread ends with :meth:`FaultProxy.stop`.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from helpers import free_port
except ImportError:  # tests/ became a package
    from tests.helpers import free_port


@contextmanager
def moto_s3(bucket: str | None = "bkt") -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with ``bucket`` (None: no bucket); yields its ``host:port``.
    Moto takes any key: the environment gets throwaway ones (restored afterwards)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    keys = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        endpoint = f"127.0.0.1:{port}"
        if bucket is not None:
            pafs.S3FileSystem(
                endpoint_override=endpoint, scheme="http", allow_bucket_creation=True
            ).create_dir(bucket)
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bucket_objects(endpoint: str, bucket: str = "bkt") -> dict[str, bytes]:
    """Every object in ``bucket``: key -> content (read directly, not through a proxy)."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http")
    infos = fs.get_file_info(pafs.FileSelector(bucket, recursive=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path] = f.read()
    return out


class FaultProxy:
    """``127.0.0.1:<port>`` -> ``target`` (``host:port``), cutting or stalling uploads.

    Attributes:
        drop / stall: faults still to inject; ``dropped`` / ``stalled``: faults injected.
    """

    def __init__(self, target: str, *, drop: int = 0, stall: int = 0, after: int = 4096) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.drop, self.stall, self.after = drop, stall, after
        self.dropped = self.stalled = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:  # the 0.2 s poll
                continue
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads.append(t)
            t.start()

    def _fault(self) -> str | None:
        with self._lock:
            if self.drop > 0:
                self.drop -= 1
                self.dropped += 1
                return "drop"
            if self.stall > 0:
                self.stall -= 1
                self.stalled += 1
                return "stall"
        return None

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        back = threading.Thread(target=self._pump, args=(server, client), daemon=True)
        back.start()
        sent, fault = 0, None
        client.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    data = client.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                sent += len(data)
                if fault is None and sent > self.after:
                    fault = self._fault() or "none"
                if fault == "drop":  # a reset mid-upload
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                if fault != "stall":  # a stalled connection swallows the rest
                    server.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()
            back.join(timeout=5)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                dst.sendall(data)
            except OSError:
                return

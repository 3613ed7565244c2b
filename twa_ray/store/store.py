"""Candidate store: a directory of candidate files on any ``pyarrow.fs`` filesystem.

Each candidate is one Arrow IPC file (format in :mod:`twa_ray.store.arrow`). A local read maps the
file copy-on-write and hands out a zero-copy ``(D,)`` float32 tensor (in-place edits stay private
to the process; the file is never modified); other filesystems (s3://, gs://, hdfs://) read the
file into memory.

Writes are atomic: the file is written under a hidden temporary name (``.<name>.<uuid>.tmp``) in
the store directory, flushed (``fsync`` for local files) and renamed, so a crash never leaves a
file that lists or loads as a candidate; readers ignore temporary files. Leftover temporary files
of crashed writers can be deleted by hand.
"""

from __future__ import annotations

import bisect
import math
import os
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from twa_ray.core.atomic import publish
from twa_ray.core.layout import Layout, flatten, unflatten
from twa_ray.redact import redact
from twa_ray.storage import filesystem_from_uri
from twa_ray.store.arrow import (
    NAME_RE,
    SUFFIX,
    TMP_SUFFIX,
    CandidateInfo,
    Header,
    check_layout_dtypes,
    check_name,
    decode,
    encode,
    fix_hint,
    map_local,
    parse_metadata,
)
from twa_ray.store.sharded import (
    PartInfo,
    Rows,
    check_rows,
    dim0_rows,
    local_numel,
    parse_part,
    part_file,
    part_metadata,
    read_local,
    scatter_rows,
    sharded_metadata,
)

__all__ = ["CandidateStore"]


@dataclass(frozen=True)
class _Staged:
    """A fully written temporary file waiting for its rename."""

    name: str
    tmp: str
    layout: Layout


def _read_remote(fs: pafs.FileSystem, path: str) -> bytearray:
    with fs.open_input_file(path) as f:
        raw = bytearray(f.size())
        view, done = memoryview(raw), 0
        while done < len(raw):
            got = f.readinto(view[done:])
            if not got:
                raise ValueError(f"{path} shrank while being read; read it again")
            done += got
    return raw


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _resolve(uri: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, uri.rstrip("/") or "/"
    if "://" in uri:
        try:
            fs, path = filesystem_from_uri(uri)  # S3: retries, bounded connects, credentials masked
        except (pa.ArrowException, ValueError) as e:
            raise ValueError(
                f"cannot open store URI {redact(uri)!r} ({redact(str(e))}); use a local path or a pyarrow.fs URI such "
                "as file:///data/run, s3://bucket/run or gs://bucket/run"
            ) from None
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _local_root(fs: pafs.FileSystem, root: str) -> str | None:
    """The OS path of ``root`` when ``fs`` is the local disk (directly or as a sub-tree)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return root
    if isinstance(fs, pafs.SubTreeFileSystem) and isinstance(fs.base_fs, pafs.LocalFileSystem):
        return os.path.join(fs.base_path, root.lstrip("/"))
    return None


class CandidateStore:
    """A directory of candidates (flat float32 parameter vectors) sharing one :class:`Layout`.

    Args:
        uri: a local path or any ``pyarrow.fs`` URI (``file://``, ``s3://``, ``gs://``, ``hdfs://``).
        create: create the directory when it does not exist (otherwise ``FileNotFoundError``).
        filesystem: a ``pyarrow.fs.FileSystem`` to use instead of resolving the URI (then ``uri``
            is a path inside it), e.g. an ``S3FileSystem`` with explicit credentials.

    >>> store = CandidateStore("/tmp/run/candidates", create=True)  # doctest: +SKIP
    >>> store.write(model.state_dict(), Layout.from_module(model), step=100)  # doctest: +SKIP
    'step-000000100'
    >>> theta = store.read("step-000000100")  # (D,) float32, memory-mapped  # doctest: +SKIP
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        *,
        create: bool = False,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        self.uri = os.fspath(uri)
        self._fs, self._root = _resolve(self.uri, filesystem)
        self._local = _local_root(self._fs, self._root)
        try:
            kind = self._fs.get_file_info(self._root).type
        except (pa.ArrowException, OSError) as e:
            raise ValueError(
                f"cannot access candidate store {redact(self.uri)!r} ({redact(str(e))}); check the --store URI (endpoint, "
                "bucket, credentials) and that its server is reachable"
            ) from None
        if kind == pafs.FileType.NotFound:
            if not create:
                raise FileNotFoundError(
                    f"candidate store {self.uri!r} does not exist; check the path given as --store"
                )
            self._fs.create_dir(self._root, recursive=True)
        elif kind != pafs.FileType.Directory:
            raise ValueError(f"candidate store {self.uri!r} is a file; a store is a directory")
        self._layout: Layout | None = None
        self._headers: dict[str, tuple[tuple[int, Any], Header]] = {}  # name -> (stat, header)

    def __repr__(self) -> str:
        return f"CandidateStore({redact(self.uri)!r})"

    # ---- paths and listing -------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{check_name(name)}{SUFFIX}"

    def _os_path(self, name: str) -> str:
        assert self._local is not None
        return os.path.join(self._local, check_name(name) + SUFFIX)

    def _list(self) -> dict[str, pafs.FileInfo]:
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=False))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"candidate store {self.uri!r} no longer exists; check the path given as --store"
            ) from None
        except (OSError, pa.ArrowException) as e:
            raise ValueError(
                f"cannot list candidate store {redact(self.uri)!r}: {redact(str(e))}"
            ) from None
        out, bad = {}, []
        for info in infos:
            base = info.base_name
            if info.type != pafs.FileType.File or not base.endswith(SUFFIX) or base.startswith("."):
                continue  # temporary files (.<name>.<uuid>.tmp) and foreign files are not candidates
            name = base.removesuffix(SUFFIX)
            if NAME_RE.fullmatch(name):
                out[name] = info
            else:
                bad.append(base)
        if bad:
            raise ValueError(
                f"candidate store {self.uri!r} holds {len(bad)} file(s) whose names are not candidate "
                f"names ({', '.join(sorted(bad)[:3])}); rename them to [A-Za-z0-9][A-Za-z0-9._-]*{SUFFIX} "
                "or move them out of the store"
            )
        return out

    def _header(self, name: str, info: pafs.FileInfo | None = None) -> Header:
        path = self._path(name)
        if info is None:
            info = self._fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self._missing(name))
        stat = (info.size, info.mtime_ns)
        cached = self._headers.get(name)
        if cached is not None and cached[0] == stat:
            return cached[1]
        try:
            with self._fs.open_input_file(path) as f:
                schema = pa.ipc.open_file(f).schema
        except FileNotFoundError:
            raise FileNotFoundError(self._missing(name)) from None
        except Exception as e:
            raise ValueError(
                f"{path} is not a readable candidate file (corrupt or truncated: "
                f"{type(e).__name__}: {str(e)[:200]}); {fix_hint(path)}"
            ) from None
        header = parse_metadata(schema.metadata, path)
        self._headers[name] = (stat, header)
        return header

    def _missing(self, name: str) -> str:
        return f"candidate {name!r} is not in store {self.uri!r} (no file {self._path(name)}); check its name"

    def names(self) -> list[str]:
        """Names of the stored candidates, sorted by step, then name.

        Reads each file's footer once (cached); a corrupt candidate file raises ``ValueError``
        naming it. Temporary files of writes in progress (or of crashed writers) are not listed.
        """
        headers = [self._header(n, info) for n, info in self._list().items()]
        return [h.info.name for h in sorted(headers, key=lambda h: (h.info.step, h.info.name))]

    def __len__(self) -> int:
        return len(self._list())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            return False
        return self._fs.get_file_info(self._path(name)).type == pafs.FileType.File

    def info(self, name: str) -> CandidateInfo:
        """Metadata of candidate ``name`` (reads the file's footer only)."""
        return self._header(name).info

    @property
    def layout(self) -> Layout | None:
        """The layout shared by all candidates (``None`` while the store is empty)."""
        if self._layout is None:
            names = self.names()
            if names:
                self._layout = self._header(names[0]).layout
        return self._layout

    # ---- reading -----------------------------------------------------------------------------

    def read(self, name: str, *, verify: bool = True) -> torch.Tensor:
        """Candidate ``name`` as a ``(D,)`` float32 tensor, checked against its stored CRC-32.

        Local files are memory-mapped copy-on-write (zero-copy; in-place edits of the tensor never
        reach the file); other filesystems read the file into memory. The checksum reads every
        page once (``bench/verify_cost.py``: a small fraction of an ``average``); ``verify=False``
        skips it, leaving pages unread until used.
        """
        path = self._path(name)
        try:
            raw = map_local(self._os_path(name)) if self._local else _read_remote(self._fs, path)
        except FileNotFoundError:
            raise FileNotFoundError(self._missing(name)) from None
        except (OSError, pa.ArrowException) as e:
            if self._fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise FileNotFoundError(self._missing(name)) from None
            raise ValueError(f"cannot read {path}: {e}") from None
        header, arr = decode(raw, path)
        layout = self.layout
        if layout is not None and header.layout.fingerprint != layout.fingerprint:
            raise ValueError(
                f"{path} has layout fingerprint {header.layout.fingerprint[:16]}, the store's "
                f"candidates have {layout.fingerprint[:16]}: it comes from another model; move it "
                "to a store of its own"
            )
        if header.sharded is not None:
            full = np.empty(header.layout.numel, dtype=np.float32)
            world, parts = header.sharded
            for r, part in enumerate(parts):
                scatter_rows(
                    full, self._read_part(name, r, world, part, verify), header.layout, part.rows
                )
            return torch.from_numpy(full)
        if verify and zlib.crc32(arr.data) != header.crc32:
            raise ValueError(
                f"{path} is corrupt (its parameter data does not match the stored CRC-32); "
                f"{fix_hint(path)}"
            )
        return torch.from_numpy(arr)

    def iter_flat(
        self, names: list[str] | None = None, *, verify: bool = True
    ) -> Iterator[torch.Tensor]:
        """Yield the candidates ``names`` (default: all, in :meth:`names` order) one at a time.

        Only the candidate being yielded is referenced, so memory stays bounded by one candidate
        (and for local stores by the pages the consumer touches).
        """
        for name in self.names() if names is None else list(names):
            yield self.read(name, verify=verify)

    def read_local(self, name: str, rank: int, world: int) -> torch.Tensor:
        """Rank ``rank``'s local flat of candidate ``name`` for a model sharded over ``world``
        ranks (:func:`~twa_ray.store.sharded.dim0_rows`): any stored world size (resharding)
        or a flat candidate; reads only the parts holding those rows."""
        header = self._header(name)
        rows = dim0_rows(header.layout, rank, world)
        if header.sharded is None:
            full = [(0, s[0] if s else 1) for s in header.layout.shapes]
            parts = [PartInfo(full, header.layout.numel, header.crc32)]
            out = read_local(lambda r: self.read(name).numpy(), header.layout, parts, rows)
        else:
            n, parts = header.sharded

            def part(r: int) -> np.ndarray:
                return self._read_part(name, r, n, parts[r], True)

            out = read_local(part, header.layout, parts, rows)
        return torch.from_numpy(out)

    def write_part(
        self,
        local: torch.Tensor,
        layout: Layout,
        *,
        name: str,
        rank: int,
        world: int,
        rows: Rows | None = None,
    ) -> None:
        """Write rank ``rank``'s local flat of sharded candidate ``name`` atomically (its rows:
        ``rows``, default FSDP2's :func:`~twa_ray.store.sharded.dim0_rows`); the candidate
        appears once :meth:`commit_parts` has seen every rank's part. A part written again
        replaces the old one."""
        self._check_layout(layout)
        check_name(name)
        rows = dim0_rows(layout, rank, world) if rows is None else check_rows(layout, rows)
        flat = local.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if flat.dim() != 1 or flat.numel() != local_numel(layout, rows):
            raise ValueError(
                f"rank {rank}'s part of {name!r} has shape {list(local.shape)}, its rows need "
                f"({local_numel(layout, rows)},)"
            )
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(
                f"rank {rank}'s part of candidate {name!r} has NaN/Inf values; a diverged "
                "snapshot cannot be averaged: lower the learning rate"
            )
        arr = flat.numpy()
        meta = part_metadata(layout, name, rank, world, rows, zlib.crc32(arr.data))
        column = pa.Array.from_buffers(pa.float32(), len(arr), [None, pa.py_buffer(arr)])
        batch = pa.record_batch(
            [column], schema=pa.schema([("flat", pa.float32(), False)], metadata=meta)
        )
        folder, base = part_file(name, rank, world).split("/")
        final = f"{self._root.rstrip('/')}/{folder}/{base}"
        if self._local is not None:
            os.makedirs(os.path.join(self._local, folder), exist_ok=True)
            publish(self._write_tmp(batch, folder, base), os.path.join(self._local, folder, base))
            _fsync_dir(os.path.join(self._local, folder))
        else:
            self._fs.create_dir(f"{self._root.rstrip('/')}/{folder}", recursive=True)
            self._fs.move(self._write_tmp(batch, folder, base), final)

    def commit_parts(
        self,
        name: str,
        layout: Layout,
        world: int,
        *,
        step: int,
        overwrite: bool = False,
        **meta: Any,
    ) -> str:
        """Make sharded candidate ``name`` visible: checks that each of the ``world`` ranks'
        parts is there and belongs to it, then writes its manifest atomically (the metadata
        ``meta``: ``epoch``, ``source``, ``seed``, ``run_id`` as in :meth:`write`). Call it
        on one rank after every rank's :meth:`write_part` (a barrier)."""
        parts = []
        for r in range(world):
            path = f"{self._root.rstrip('/')}/{part_file(name, r, world)}"
            try:
                with self._fs.open_input_file(path) as f:
                    m = parse_part(pa.ipc.open_file(f).schema.metadata, path)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"sharded candidate {name!r} misses rank {r}'s part ({path}): every rank "
                    "writes its part before the candidate is committed; snapshot it again"
                ) from None
            if (m.get("rank"), m.get("world"), m.get("fingerprint")) != (
                r,
                world,
                layout.fingerprint,
            ):
                raise ValueError(
                    f"{path} is not rank {r} of {world}'s part of this model; snapshot it again"
                )
            rows = check_rows(layout, m["rows"])
            parts.append(PartInfo(rows, local_numel(layout, rows), int(m["crc32"])))
        meta = {"epoch": 0.0, "source": "", "seed": None, "run_id": "", **meta}
        staged = self._stage(
            None,
            layout,
            step=step,
            name=name,
            overwrite=overwrite,
            extra=sharded_metadata(world, parts),
            **meta,
        )
        try:
            self._commit(staged, overwrite=overwrite)
        finally:
            self._discard(staged)
        return name

    def _read_part(
        self, name: str, rank: int, world: int, part: PartInfo, verify: bool
    ) -> np.ndarray:
        """Rank ``rank``'s values of sharded candidate ``name``, checked against its manifest."""
        path = f"{self._root.rstrip('/')}/{part_file(name, rank, world)}"
        try:
            raw: Any
            if self._local:
                raw = map_local(os.path.join(self._local, part_file(name, rank, world)))
            else:
                raw = _read_remote(self._fs, path)
            batch = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(raw))).get_batch(0)
            arr = batch.column(0).to_numpy(zero_copy_only=False)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"sharded candidate {name!r} misses rank {rank}'s part {path}; {fix_hint(path)}"
            ) from None
        except (OSError, pa.ArrowException, IndexError) as e:
            raise ValueError(f"cannot read {path} ({e}); {fix_hint(path)}") from None
        if len(arr) != part.numel or (verify and zlib.crc32(arr) != part.crc32):
            raise ValueError(
                f"{path} is corrupt (it does not match the CRC-32 or size its manifest records); "
                f"{fix_hint(path)}"
            )
        return arr

    def read_state(self, name: str) -> dict[str, torch.Tensor]:
        """Candidate ``name`` as a state dict of its parameters, in their original dtypes."""
        vec = self.read(name)
        return unflatten(vec, self._header(name).layout)

    # ---- writing -----------------------------------------------------------------------------

    def write(
        self,
        params: torch.Tensor | Mapping[str, torch.Tensor],
        layout: Layout,
        *,
        step: int,
        epoch: float = 0.0,
        source: str = "",
        seed: int | None = None,
        run_id: str = "",
        name: str | None = None,
        overwrite: bool = False,
    ) -> str:
        """Store one candidate atomically; returns its name.

        Args:
            params: the flat ``(D,)`` vector (any float dtype, any device) or a name -> tensor
                mapping (e.g. ``model.state_dict()``; entries outside ``layout`` are ignored).
            layout: the parameters' layout; must match the layout of the store's candidates.
            step, epoch, source, seed, run_id: metadata stored with the candidate.
            name: the candidate's name; default ``step-<step:09d>`` (prefixed by ``run_id-`` when
                ``run_id`` is given).
            overwrite: replace an existing candidate of that name (otherwise ``FileExistsError``).

        Raises:
            ValueError: NaN/Inf in ``params``, a layout other than the store's, bad metadata.
        """
        staged = self._stage(
            params,
            layout,
            step=step,
            epoch=epoch,
            source=source,
            seed=seed,
            run_id=run_id,
            name=name,
            overwrite=overwrite,
        )
        try:
            self._commit(staged, overwrite=overwrite)
        finally:
            self._discard(staged)
        return staged.name

    @contextmanager
    def write_together(self, *, drop_if_empty: bool = False) -> Iterator[Callable[..., str]]:
        """All or nothing: candidates given to the yielded ``write(params, layout, step=...,
        ...)`` (the arguments of :meth:`write`, never overwriting) are staged and appear when
        the block ends, none of them when it raises (``drop_if_empty``: then the store's folder
        too, if nothing else is in it)."""
        staged: list[_Staged] = []

        def write(params: Any, layout: Layout, **meta: Any) -> str:
            meta = {"epoch": 0.0, "source": "", "seed": None, "run_id": "", "name": None, **meta}
            staged.append(self._stage(params, layout, overwrite=False, **meta))
            return staged[-1].name

        committed = False
        try:
            yield write
            for s in staged:
                self._commit(s, overwrite=False)
            committed = True
        finally:
            for s in staged:
                self._discard(s)
            if drop_if_empty and not committed:
                self._remove_if_empty()

    def _check_layout(self, layout: Layout) -> None:
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a twa_ray Layout, got {type(layout).__name__}")
        check_layout_dtypes(layout)
        mine = self.layout
        if mine is None or mine.fingerprint == layout.fingerprint:
            return
        try:
            mine.check_compatible(layout)
            detail = ""
        except ValueError as e:
            detail = f" ({str(e).split(';')[0]})"
        raise ValueError(
            f"layout fingerprint {layout.fingerprint[:16]} differs from the fingerprint "
            f"{mine.fingerprint[:16]} of the candidates in store {self.uri!r}{detail}; every "
            "candidate of a store comes from one model: write to another store, or use the "
            "--model the store was filled from"
        )

    def _stage(
        self,
        params: torch.Tensor | Mapping[str, torch.Tensor] | None,
        layout: Layout,
        *,
        step: int,
        epoch: float,
        source: str,
        seed: int | None,
        run_id: str,
        name: str | None,
        overwrite: bool,
        extra: Mapping[bytes, bytes] | None = None,
    ) -> _Staged:
        """Validate and write a candidate to a temporary file in the store (not yet visible)."""
        self._check_layout(layout)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if (
            not isinstance(epoch, (int, float))
            or isinstance(epoch, bool)
            or not math.isfinite(epoch)
        ):
            raise ValueError(f"epoch must be a finite number, got {epoch!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if not isinstance(source, str) or not isinstance(run_id, str):
            raise ValueError("source and run_id must be strings")
        if name is None:
            name = f"{run_id}-step-{step:09d}" if run_id else f"step-{step:09d}"
        check_name(name)
        if not overwrite and name in self:
            raise FileExistsError(self._exists(name))
        # a sharded candidate's manifest (``extra``) holds no values: its parts do
        flat = np.empty(0, "f4") if params is None else self._flat(params, layout, name, source)
        batch = encode(
            flat,
            layout,
            name=name,
            step=step,
            epoch=epoch,
            source=source,
            seed=seed,
            run_id=run_id,
            extra=extra,
        )
        return _Staged(name, self._write_tmp(batch, "", name), layout)

    def _write_tmp(self, batch: pa.RecordBatch, folder: str, base: str) -> str:
        """Write ``batch`` as an Arrow IPC file under a hidden temporary name in the store's
        sub-folder ``folder`` ("": the store itself), flushed; returns its path."""
        schema = batch.schema
        tmp_name = f".{base}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        if self._local is not None:
            tmp = os.path.join(self._local, folder, tmp_name)
            try:
                with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                    writer.write_batch(batch)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)  # the data is on disk before the rename makes it visible
                finally:
                    os.close(fd)
            except BaseException:
                _remove_quietly(tmp)
                raise
        else:
            tmp = "/".join(p for p in (self._root.rstrip("/"), folder, tmp_name) if p)
            try:
                with (
                    self._fs.open_output_stream(tmp) as sink,
                    pa.ipc.new_file(sink, schema) as writer,
                ):
                    writer.write_batch(batch)
            except BaseException:
                self._delete_quietly(tmp)
                raise
        return tmp

    def _flat(
        self,
        params: torch.Tensor | Mapping[str, torch.Tensor],
        layout: Layout,
        name: str,
        source: str,
    ) -> np.ndarray:
        if isinstance(params, torch.Tensor):
            if params.dim() != 1 or params.numel() != layout.numel:
                raise ValueError(
                    f"flat parameters have shape {list(params.shape)}, the layout needs "
                    f"({layout.numel},); pass flatten(model, layout) or a state dict"
                )
            if not params.is_floating_point():
                raise ValueError(f"flat parameters must be floating point, got {params.dtype}")
            flat = params.detach().to(device="cpu", dtype=torch.float32)
        elif isinstance(params, Mapping):
            flat = flatten(params, layout).cpu()
        else:
            raise TypeError(
                f"params must be a tensor or a mapping of tensors, got {type(params).__name__}"
            )
        flat = flat.contiguous()
        bad = ~torch.isfinite(flat)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            tensor = layout.names[bisect.bisect_right(layout.offsets, first) - 1]
            where = f" (from {source})" if source else ""
            raise ValueError(
                f"candidate {name!r}{where} has {int(bad.sum())} NaN/Inf values, first in "
                f"parameter {tensor!r}; a diverged snapshot cannot be averaged: lower the learning "
                "rate or drop this checkpoint"
            )
        return flat.numpy()

    def _exists(self, name: str) -> str:
        return (
            f"candidate {name!r} already exists in store {self.uri!r}; pass another name, "
            "or use a new store"
        )

    def _commit(self, staged: _Staged, *, overwrite: bool) -> None:
        """Rename a staged file to its final name: the candidate appears atomically."""
        if self._local is not None:
            try:
                publish(staged.tmp, self._os_path(staged.name), overwrite=overwrite)
            except FileExistsError:
                raise FileExistsError(self._exists(staged.name)) from None
            _fsync_dir(self._local)
        else:
            final = self._path(staged.name)
            if not overwrite and self._fs.get_file_info(final).type != pafs.FileType.NotFound:
                raise FileExistsError(self._exists(staged.name))
            self._fs.move(staged.tmp, final)
        self._headers.pop(staged.name, None)
        if self._layout is None:
            self._layout = staged.layout

    def _discard(self, staged: _Staged) -> None:
        """Remove a staged file if it is still there (after a failure)."""
        if self._local is not None:
            _remove_quietly(staged.tmp)
        else:
            self._delete_quietly(staged.tmp)

    def _remove_if_empty(self) -> None:
        try:
            if not self._fs.get_file_info(pafs.FileSelector(self._root)):
                self._fs.delete_dir(self._root)
        except (OSError, pa.ArrowException):
            pass

    def _delete_quietly(self, path: str) -> None:
        try:
            if self._fs.get_file_info(path).type == pafs.FileType.File:
                self._fs.delete_file(path)
        except (OSError, pa.ArrowException):
            pass


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

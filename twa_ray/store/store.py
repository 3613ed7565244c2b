"""Candidate store: one Arrow IPC file per candidate θ_k, on any ``pyarrow.fs`` filesystem.

File format (version 1). ``<name>.arrow`` is an Arrow IPC *file* holding one record batch with
one non-nullable float32 column ``flat`` of length D: the candidate's parameters flattened in
layout order (:func:`twa_ray.core.layout.flatten`). The schema metadata holds

- ``twa_ray.layout``: the layout JSON (names, shapes, dtypes), so a file alone rebuilds a state dict;
- ``twa_ray.candidate``: JSON with ``format``, ``fingerprint`` (of the layout), ``numel``, ``step``,
  ``epoch``, ``source``, ``seed``, ``run_id``, ``name``, ``crc32`` (of the float32 bytes).

One contiguous column is what memory-maps best: a local read maps the file copy-on-write and hands
out a zero-copy ``(D,)`` float32 tensor (in-place edits stay private to the process; the file is
never modified). float16 / bfloat16 parameters are exact in float32; float64 parameters are
rounded to float32.

Writes are atomic: the file is written under a hidden temporary name (``.<name>.<uuid>.tmp``) in
the store directory, flushed (``fsync`` for local files) and renamed, so a crash never leaves a
file that lists or loads as a candidate; readers ignore temporary files. Leftover temporary files
of crashed writers can be deleted by hand.
"""

from __future__ import annotations

import bisect
import json
import math
import mmap
import os
import re
import sys
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from twa_ray.core.layout import Layout, flatten, unflatten

__all__ = ["CandidateInfo", "CandidateStore", "FORMAT_VERSION", "SUFFIX"]

FORMAT_VERSION = 1  # bump on any incompatible change of the file format
SUFFIX = ".arrow"  # candidate files are <name>.arrow
_TMP_SUFFIX = ".tmp"
_COLUMN = "flat"
_META_LAYOUT = b"twa_ray.layout"
_META_CANDIDATE = b"twa_ray.candidate"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SCHEMA = pa.schema([pa.field(_COLUMN, pa.float32(), nullable=False)])


@dataclass(frozen=True)
class CandidateInfo:
    """Metadata of one stored candidate.

    Attributes:
        name: the candidate's name (its file is ``<name>.arrow``).
        step: optimizer step at which it was taken (import order for imported checkpoints).
        epoch: (fractional) epoch at which it was taken.
        source: where it came from (e.g. the imported file's path).
        seed: seed of the run that produced it, if known.
        run_id: id of the run that produced it.
    """

    name: str
    step: int
    epoch: float
    source: str
    seed: int | None
    run_id: str


@dataclass(frozen=True)
class _Header:
    info: CandidateInfo
    layout: Layout
    crc32: int


@dataclass(frozen=True)
class _Staged:
    """A fully written temporary file waiting for its rename."""

    name: str
    tmp: str
    layout: Layout


def _fix(path: str) -> str:
    return f"delete {path} and write the candidate again (CandidateStore.write or `twa-ray import`)"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith(_TMP_SUFFIX):
        raise ValueError(
            f"candidate name {name!r} is not allowed; use 1-200 characters from [A-Za-z0-9._-] "
            f"starting with a letter or digit and not ending in {_TMP_SUFFIX!r} (e.g. 'step-000100')"
        )
    return name


def _check_layout_dtypes(layout: Layout) -> None:
    bad = [(n, d) for n, d in zip(layout.names, layout.dtypes) if d not in _FLOAT_DTYPES]
    if bad:
        raise ValueError(
            f"parameter {bad[0][0]!r} has dtype {bad[0][1]}; the candidate store holds "
            f"floating-point parameters only ({', '.join(_FLOAT_DTYPES)})"
        )


class _NewerFormat(Exception):
    pass


def _parse_metadata(metadata: Mapping[bytes, bytes] | None, path: str) -> _Header:
    """Validate a file's schema metadata; any defect is a ``ValueError`` naming ``path``."""
    if not metadata or _META_LAYOUT not in metadata or _META_CANDIDATE not in metadata:
        raise ValueError(
            f"{path} is an Arrow file but not a twa_ray candidate (no twa_ray metadata); {_fix(path)}"
        )
    try:
        meta = json.loads(metadata[_META_CANDIDATE])
        version = meta["format"]
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"bad format version {version!r}")
        if version > FORMAT_VERSION:
            raise _NewerFormat(version)
        layout = Layout.from_json(metadata[_META_LAYOUT])
        if any(s < 0 for shape in layout.shapes for s in shape):
            raise ValueError("negative dimension in layout")
        _check_layout_dtypes(layout)
        if meta["fingerprint"] != layout.fingerprint:
            raise ValueError("layout fingerprint does not match the stored layout")
        if meta["numel"] != layout.numel:
            raise ValueError("numel does not match the stored layout")
        step, epoch, seed = meta["step"], meta["epoch"], meta["seed"]
        source, run_id, crc = meta["source"], meta["run_id"], meta["crc32"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"bad step {step!r}")
        if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
            raise ValueError(f"bad epoch {epoch!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"bad seed {seed!r}")
        if not isinstance(source, str) or not isinstance(run_id, str):
            raise ValueError("bad source or run_id")
        if not isinstance(crc, int) or isinstance(crc, bool):
            raise ValueError(f"bad crc32 {crc!r}")
    except _NewerFormat as e:
        raise ValueError(
            f"{path} was written by a newer twa_ray (file format {e.args[0]}, this version reads "
            f"<= {FORMAT_VERSION}); upgrade twa_ray"
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as e:
        raise ValueError(f"{path} has corrupt candidate metadata ({e}); {_fix(path)}") from None
    name = os.path.basename(path).removesuffix(SUFFIX)
    info = CandidateInfo(name, step, float(epoch), source, seed, run_id)
    return _Header(info, layout, crc)


def _parse_file(raw: Any, path: str) -> tuple[_Header, np.ndarray]:
    """Parse a whole candidate file held in the writable buffer ``raw``.

    Returns the header and a float32 numpy view *into* ``raw`` (zero-copy), so a copy-on-write
    ``mmap`` gives a memory-mapped candidate.
    """
    base = pa.py_buffer(raw)
    try:
        reader = pa.ipc.open_file(pa.BufferReader(base))
        schema = reader.schema
        num_batches = reader.num_record_batches
        batch = reader.get_batch(0) if num_batches == 1 else None
        if batch is not None:
            batch.validate(full=True)
    except Exception as e:  # pyarrow raises many types on garbage; the user needs one
        raise ValueError(
            f"{path} is not a readable candidate file (corrupt or truncated: {type(e).__name__}: "
            f"{str(e)[:200]}); {_fix(path)}"
        ) from None
    header = _parse_metadata(schema.metadata, path)
    n = header.layout.numel
    if schema.names != [_COLUMN] or schema.types != [pa.float32()] or batch is None:
        raise ValueError(
            f"{path} has the wrong schema ({schema.types}, {num_batches} record batches); expected "
            f"one record batch with one float32 column {_COLUMN!r}; {_fix(path)}"
        )
    col = batch.column(0)
    if len(col) != n or col.null_count:
        raise ValueError(
            f"{path} holds {len(col)} values ({col.null_count} null), its layout needs {n}; "
            f"{_fix(path)}"
        )
    if n == 0:
        return header, np.empty(0, dtype=np.float32)
    start = col.buffers()[1].address - base.address + 4 * col.offset
    if 0 <= start and start + 4 * n <= base.size and start % 4 == 0:
        arr = np.frombuffer(raw, dtype=np.float32, count=n, offset=start)
    else:  # the reader copied the buffer (e.g. realigned it): fall back to a private copy
        arr = col.to_numpy(zero_copy_only=False).copy()
    return header, arr


def _map_local(path: str) -> mmap.mmap:
    """Copy-on-write map of a local file (private, writable, never written back)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path} is empty (a truncated candidate); {_fix(path)}")
        kwargs: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY, **kwargs)


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
            fs, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, ValueError) as e:
            raise ValueError(
                f"cannot open store URI {uri!r} ({e}); use a local path or a pyarrow.fs URI such "
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
        self, uri: str | os.PathLike[str], *, create: bool = False, filesystem: pafs.FileSystem | None = None
    ) -> None:
        self.uri = os.fspath(uri)
        self._fs, self._root = _resolve(self.uri, filesystem)
        self._local = _local_root(self._fs, self._root)
        try:
            kind = self._fs.get_file_info(self._root).type
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"cannot access candidate store {self.uri!r}: {e}") from None
        if kind == pafs.FileType.NotFound:
            if not create:
                raise FileNotFoundError(
                    f"candidate store {self.uri!r} does not exist; check the path, or pass "
                    "create=True to start a new store (CandidateStore(uri, create=True))"
                )
            self._fs.create_dir(self._root, recursive=True)
        elif kind != pafs.FileType.Directory:
            raise ValueError(f"candidate store {self.uri!r} is a file; a store is a directory")
        self._layout: Layout | None = None
        self._headers: dict[str, tuple[tuple[int, Any], _Header]] = {}  # name -> (stat, header)

    def __repr__(self) -> str:
        return f"CandidateStore({self.uri!r})"

    # ---- paths and listing -------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{_check_name(name)}{SUFFIX}"

    def _os_path(self, name: str) -> str:
        assert self._local is not None
        return os.path.join(self._local, _check_name(name) + SUFFIX)

    def _list(self) -> dict[str, pafs.FileInfo]:
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=False))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"candidate store {self.uri!r} no longer exists; recreate it with "
                "CandidateStore(uri, create=True)"
            ) from None
        out = {}
        for info in infos:
            base = info.base_name
            if info.type != pafs.FileType.File or not base.endswith(SUFFIX):
                continue  # temporary files (.<name>.<uuid>.tmp) and foreign files are ignored
            name = base.removesuffix(SUFFIX)
            if _NAME_RE.fullmatch(name):
                out[name] = info
        return out

    def _header(self, name: str, info: pafs.FileInfo | None = None) -> _Header:
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
                f"{type(e).__name__}: {str(e)[:200]}); {_fix(path)}"
            ) from None
        header = _parse_metadata(schema.metadata, path)
        self._headers[name] = (stat, header)
        return header

    def _missing(self, name: str) -> str:
        return (
            f"candidate {name!r} is not in store {self.uri!r} (no file {self._path(name)}); "
            "list the candidates with CandidateStore.names()"
        )

    def names(self) -> list[str]:
        """Names of the stored candidates, sorted by step, then name."""
        headers = [self._header(n, info) for n, info in self._list().items()]
        return [h.info.name for h in sorted(headers, key=lambda h: (h.info.step, h.info.name))]

    def __len__(self) -> int:
        return len(self._list())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
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

    def read(self, name: str, *, verify: bool = False) -> torch.Tensor:
        """Candidate ``name`` as a ``(D,)`` float32 tensor.

        Local files are memory-mapped copy-on-write (zero-copy; the OS pages data in on use, and
        in-place edits of the tensor never reach the file); other filesystems read the file into
        memory. ``verify=True`` also checks the data against the stored CRC-32 (reads every page).
        """
        path = self._path(name)
        try:
            raw = _map_local(self._os_path(name)) if self._local else _read_remote(self._fs, path)
        except FileNotFoundError:
            raise FileNotFoundError(self._missing(name)) from None
        except (OSError, pa.ArrowException) as e:
            if self._fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise FileNotFoundError(self._missing(name)) from None
            raise ValueError(f"cannot read {path}: {e}") from None
        header, arr = _parse_file(raw, path)
        layout = self.layout
        if layout is not None and header.layout.fingerprint != layout.fingerprint:
            raise ValueError(
                f"{path} has layout fingerprint {header.layout.fingerprint[:16]}, the store's "
                f"candidates have {layout.fingerprint[:16]}: it comes from another model; move it "
                "to a store of its own"
            )
        if verify and zlib.crc32(arr) != header.crc32:
            raise ValueError(f"{path} is corrupt (CRC-32 mismatch of the parameter data); {_fix(path)}")
        return torch.from_numpy(arr)

    def iter_flat(self, names: list[str] | None = None, *, verify: bool = False) -> Iterator[torch.Tensor]:
        """Yield the candidates ``names`` (default: all, in :meth:`names` order) one at a time.

        Only the candidate being yielded is referenced, so memory stays bounded by one candidate
        (and for local stores by the pages the consumer touches).
        """
        for name in self.names() if names is None else list(names):
            yield self.read(name, verify=verify)

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
            params, layout, step=step, epoch=epoch, source=source, seed=seed, run_id=run_id,
            name=name, overwrite=overwrite,
        )
        try:
            self._commit(staged, overwrite=overwrite)
        finally:
            self._discard(staged)
        return staged.name

    def _check_layout(self, layout: Layout) -> None:
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a twa_ray Layout, got {type(layout).__name__}")
        _check_layout_dtypes(layout)
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
            "candidate of a store comes from one model: write to another store, or pass the "
            "layout of the model the store was filled from (Layout.from_module(model))"
        )

    def _stage(
        self,
        params: torch.Tensor | Mapping[str, torch.Tensor],
        layout: Layout,
        *,
        step: int,
        epoch: float,
        source: str,
        seed: int | None,
        run_id: str,
        name: str | None,
        overwrite: bool,
    ) -> _Staged:
        """Validate and write a candidate to a temporary file in the store (not yet visible)."""
        self._check_layout(layout)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or not math.isfinite(epoch):
            raise ValueError(f"epoch must be a finite number, got {epoch!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if not isinstance(source, str) or not isinstance(run_id, str):
            raise ValueError("source and run_id must be strings")
        if name is None:
            name = f"{run_id}-step-{step:09d}" if run_id else f"step-{step:09d}"
        _check_name(name)
        if not overwrite and name in self:
            raise FileExistsError(self._exists(name))
        flat = self._flat(params, layout, name, source)
        crc = zlib.crc32(flat)
        meta = {
            "format": FORMAT_VERSION, "fingerprint": layout.fingerprint, "numel": layout.numel,
            "step": step, "epoch": float(epoch), "source": source, "seed": seed, "run_id": run_id,
            "name": name, "crc32": crc,
        }  # fmt: skip
        schema = _SCHEMA.with_metadata(
            {_META_LAYOUT: layout.to_json().encode(), _META_CANDIDATE: json.dumps(meta).encode()}
        )
        column = pa.Array.from_buffers(pa.float32(), len(flat), [None, pa.py_buffer(flat)])
        batch = pa.record_batch([column], schema=schema)
        tmp_name = f".{name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
        if self._local is not None:
            tmp = os.path.join(self._local, tmp_name)
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
            tmp = f"{self._root.rstrip('/')}/{tmp_name}"
            try:
                with self._fs.open_output_stream(tmp) as sink, pa.ipc.new_file(sink, schema) as writer:
                    writer.write_batch(batch)
            except BaseException:
                self._delete_quietly(tmp)
                raise
        return _Staged(name, tmp, layout)

    def _flat(
        self, params: torch.Tensor | Mapping[str, torch.Tensor], layout: Layout, name: str, source: str
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
            raise TypeError(f"params must be a tensor or a mapping of tensors, got {type(params).__name__}")
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
            "overwrite=True to replace it, or use a new store"
        )

    def _commit(self, staged: _Staged, *, overwrite: bool) -> None:
        """Rename a staged file to its final name: the candidate appears atomically."""
        if self._local is not None:
            final = self._os_path(staged.name)
            if overwrite:
                os.replace(staged.tmp, final)
            else:
                try:
                    os.link(staged.tmp, final)  # atomic create-if-absent
                except FileExistsError:
                    raise FileExistsError(self._exists(staged.name)) from None
                except OSError:  # no hard links on this filesystem
                    if os.path.exists(final):
                        raise FileExistsError(self._exists(staged.name)) from None
                    os.replace(staged.tmp, final)
            _fsync_dir(self._local)
        else:
            final = self._path(staged.name)
            if not overwrite and self._fs.get_file_info(final).type != pafs.FileType.NotFound:
                raise FileExistsError(self._exists(staged.name))
            self._fs.move(staged.tmp, final)
        if self._layout is None:
            self._layout = staged.layout

    def _discard(self, staged: _Staged) -> None:
        """Remove a staged file if it is still there (after a failure, or after ``os.link``)."""
        if self._local is not None:
            _remove_quietly(staged.tmp)
        else:
            self._delete_quietly(staged.tmp)

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

"""Candidate file format: one Arrow IPC file per candidate θ_k.

Version 2 (version 1 files read the same; 2 adds sharded candidates, whose ``<name>.arrow`` is a
manifest of per-rank parts: :mod:`twa_ray.store.sharded`). ``<name>.arrow`` is an Arrow IPC *file* holding one record batch with one
non-nullable float32 column ``flat`` of length D: the candidate's parameters flattened in layout
order (:func:`twa_ray.core.layout.flatten`). The schema metadata holds

- ``twa_ray.layout``: the layout JSON (names, shapes, dtypes), so a file alone rebuilds a state dict;
- ``twa_ray.candidate``: JSON with ``format``, ``fingerprint`` (of the layout), ``numel``, ``step``,
  ``epoch``, ``source``, ``seed``, ``run_id``, ``name``, ``crc32`` (of the float32 bytes).

One contiguous column is what memory-maps best: :func:`decode` returns a float32 numpy view *into*
the buffer it is given, so decoding a copy-on-write ``mmap`` of a local file is zero-copy.
float16 / bfloat16 parameters are exact in float32; float64 parameters are rounded to float32.
Any defect of a file (truncated, corrupt, foreign, newer format) is one ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from twa_ray.core.layout import Layout
from twa_ray.store.sharded import PartInfo, parse_sharded

__all__ = ["FORMAT_VERSION", "SUFFIX", "TMP_SUFFIX", "CandidateInfo", "decode", "encode"]

FORMAT_VERSION = 2  # bump on any incompatible change of the file format (2: sharded candidates)
FLAT_FORMAT = 1  # a flat candidate is still written as format 1: older readers keep reading it
SUFFIX = ".arrow"  # candidate files are <name>.arrow
TMP_SUFFIX = ".tmp"
_COLUMN = "flat"
_META_LAYOUT = b"twa_ray.layout"
_META_CANDIDATE = b"twa_ray.candidate"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
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
class Header:
    info: CandidateInfo
    layout: Layout
    crc32: int
    sharded: tuple[int, list[PartInfo]] | None = None
    """A sharded candidate's world size and parts (:mod:`twa_ray.store.sharded`), else None."""


def fix_hint(path: str) -> str:
    return f"delete {path} and write the candidate again (twa-ray import, or rerun the sampling)"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.endswith(TMP_SUFFIX):
        raise ValueError(
            f"candidate name {name!r} is not allowed; use 1-200 characters from [A-Za-z0-9._-] "
            f"starting with a letter or digit and not ending in {TMP_SUFFIX!r} (e.g. 'step-000100')"
        )
    return name


def check_layout_dtypes(layout: Layout) -> None:
    bad = [(n, d) for n, d in zip(layout.names, layout.dtypes) if d not in _FLOAT_DTYPES]
    if bad:
        raise ValueError(
            f"parameter {bad[0][0]!r} has dtype {bad[0][1]}; the candidate store holds "
            f"floating-point parameters only ({', '.join(_FLOAT_DTYPES)})"
        )


class _NewerFormat(Exception):
    pass


def parse_metadata(metadata: Mapping[bytes, bytes] | None, path: str) -> Header:
    """Validate a file's schema metadata; any defect is a ``ValueError`` naming ``path``."""
    if not metadata or _META_LAYOUT not in metadata or _META_CANDIDATE not in metadata:
        raise ValueError(
            f"{path} is an Arrow file but not a twa_ray candidate (no twa_ray metadata); {fix_hint(path)}"
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
        check_layout_dtypes(layout)
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
        raise ValueError(f"{path} has corrupt candidate metadata ({e}); {fix_hint(path)}") from None
    name = os.path.basename(path).removesuffix(SUFFIX)
    info = CandidateInfo(name, step, float(epoch), source, seed, run_id)
    return Header(info, layout, crc, parse_sharded(metadata, layout, path))


def decode(raw: Any, path: str) -> tuple[Header, np.ndarray]:
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
            f"{str(e)[:200]}); {fix_hint(path)}"
        ) from None
    header = parse_metadata(schema.metadata, path)
    n = 0 if header.sharded else header.layout.numel  # a sharded candidate's values are its parts'
    if schema.names != [_COLUMN] or schema.types != [pa.float32()] or batch is None:
        raise ValueError(
            f"{path} has the wrong schema ({schema.types}, {num_batches} record batches); expected "
            f"one record batch with one float32 column {_COLUMN!r}; {fix_hint(path)}"
        )
    col = batch.column(0)
    if len(col) != n or col.null_count:
        raise ValueError(
            f"{path} holds {len(col)} values ({col.null_count} null), its layout needs {n}; "
            f"{fix_hint(path)}"
        )
    if n == 0:
        return header, np.empty(0, dtype=np.float32)
    start = col.buffers()[1].address - base.address + 4 * col.offset
    if 0 <= start and start + 4 * n <= base.size and start % 4 == 0:
        arr = np.frombuffer(raw, dtype=np.float32, count=n, offset=start)
    else:  # the reader copied the buffer (e.g. realigned it): fall back to a private copy
        arr = col.to_numpy(zero_copy_only=False).copy()
    return header, arr


def map_local(path: str) -> mmap.mmap:
    """Copy-on-write map of a local file (private, writable, never written back)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path} is empty (a truncated candidate); {fix_hint(path)}")
        kwargs: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY, **kwargs)


def encode(
    flat: np.ndarray,
    layout: Layout,
    *,
    name: str,
    step: int,
    epoch: float,
    source: str,
    seed: int | None,
    run_id: str,
    extra: Mapping[bytes, bytes] | None = None,
) -> pa.RecordBatch:
    """The record batch (schema and metadata included) of a validated float32 ``(D,)`` array
    (or of a sharded candidate's manifest: no values, ``extra`` metadata)."""
    meta = {
        "format": FORMAT_VERSION if extra else FLAT_FORMAT,
        "fingerprint": layout.fingerprint,
        "numel": layout.numel,
        "step": step,
        "epoch": float(epoch),
        "source": source,
        "seed": seed,
        "run_id": run_id,
        "name": name,
        "crc32": zlib.crc32(flat.data),
    }
    schema = _SCHEMA.with_metadata(
        {
            _META_LAYOUT: layout.to_json().encode(),
            _META_CANDIDATE: json.dumps(meta).encode(),
            **(extra or {}),
        }
    )
    column = pa.Array.from_buffers(pa.float32(), len(flat), [None, pa.py_buffer(flat)])
    return pa.record_batch([column], schema=schema)

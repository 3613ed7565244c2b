"""Sharded candidates: each rank of a sharded model (FSDP2) writes its own rows, nobody gathers.

A parameter of global shape ``(n_0, n_1, ...)`` sharded on dim 0 over ``W`` ranks gives rank ``r``
the rows ``[r c, min((r + 1) c, n_0))`` with ``c = ceil(n_0 / W)`` (``torch.chunk``, FSDP2's
``Shard(0)``; the last ranks may hold fewer rows or none). A rank's *local flat* is its rows of
every parameter, flattened in layout order.

On disk, candidate ``<name>`` is

- ``<name>.parts/part-<r>-of-<W>.arrow``, one per rank: an Arrow IPC file with one float32 column
  (the local flat) and metadata ``twa_ray.part`` (``rank``, ``world``, the layout's
  ``fingerprint``, ``rows``: the ``[start, stop)`` dim-0 rows per parameter, ``crc32``), each
  written atomically by its rank;
- ``<name>.arrow``, the manifest, written last by rank 0 once every part is there (after a
  barrier): the layout and candidate metadata of a flat candidate (format 2) with zero values,
  plus ``twa_ray.sharded`` (``world``, each part's ``rows``, ``numel`` and ``crc32``).

Only the manifest makes the candidate visible, so a candidate missing a part is never listed.
Reading it back as a ``(D,)`` vector places every part's rows; :func:`read_local` gives any
rank's local flat for another world size (reading only the rows it needs from each part).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from twa_ray.core.layout import Layout
from twa_ray.core.sharded import chunk_rows

__all__ = ["PartInfo", "dim0_rows", "local_numel", "part_file", "read_local", "scatter_rows"]

META_PART = b"twa_ray.part"
META_SHARDED = b"twa_ray.sharded"
PARTS_SUFFIX = ".parts"

Rows = Sequence[tuple[int, int]]
"""``[start, stop)`` dim-0 rows of every parameter of a layout, in layout order."""


def dim0_rows(layout: Layout, rank: int, world: int) -> Rows:
    """The rows of every parameter that rank ``rank`` of ``world`` holds under FSDP2's ``Shard(0)``
    (:func:`~twa_ray.core.sharded.chunk_rows`; a 0-d parameter counts as one row)."""
    return [chunk_rows(shape[0] if shape else 1, world, rank) for shape in layout.shapes]


def _row_numel(shape: Sequence[int]) -> int:
    return math.prod(shape[1:]) if shape else 1


def local_numel(layout: Layout, rows: Rows) -> int:
    """Elements of a local flat holding ``rows``."""
    return sum((b - a) * _row_numel(s) for (a, b), s in zip(rows, layout.shapes, strict=True))


def check_rows(layout: Layout, rows: Any) -> Rows:
    """``rows`` as a list of int pairs inside every parameter's dim 0, else ``ValueError``."""
    out = [(int(a), int(b)) for a, b in rows]
    if len(out) != len(layout.shapes):
        raise ValueError(f"{len(out)} row ranges for {len(layout.shapes)} parameters")
    for (a, b), shape in zip(out, layout.shapes, strict=True):
        if not 0 <= a <= b <= (shape[0] if shape else 1):
            raise ValueError(f"rows [{a}, {b}) outside a parameter of shape {list(shape)}")
    return out


def part_file(name: str, rank: int, world: int) -> str:
    """The path of rank ``rank``'s part of candidate ``name``, relative to the store."""
    return f"{name}{PARTS_SUFFIX}/part-{rank:05d}-of-{world:05d}.arrow"


@dataclass(frozen=True)
class PartInfo:
    """One rank's part as the manifest records it."""

    rows: Rows
    numel: int
    crc32: int


def part_metadata(layout: Layout, name: str, rank: int, world: int, rows: Rows, crc: int) -> dict:
    return {
        META_PART: json.dumps(
            {
                "format": 2,
                "name": name,
                "rank": rank,
                "world": world,
                "fingerprint": layout.fingerprint,
                "rows": [list(r) for r in rows],
                "crc32": crc,
            }
        ).encode()
    }


def sharded_metadata(world: int, parts: Sequence[PartInfo]) -> dict:
    body = {
        "world": world,
        "parts": [
            {"rows": [list(r) for r in p.rows], "numel": p.numel, "crc32": p.crc32} for p in parts
        ],
    }
    return {META_SHARDED: json.dumps(body).encode()}


def parse_sharded(metadata: Any, layout: Layout, path: str) -> tuple[int, list[PartInfo]] | None:
    """``(world, parts)`` of a manifest's metadata, None for a flat candidate."""
    if not metadata or META_SHARDED not in metadata:
        return None
    try:
        body = json.loads(metadata[META_SHARDED])
        world = int(body["world"])
        parts = [
            PartInfo(check_rows(layout, p["rows"]), int(p["numel"]), int(p["crc32"]))
            for p in body["parts"]
        ]
        if world < 1 or len(parts) != world:
            raise ValueError(f"{len(parts)} parts for a world of {world}")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path} has corrupt sharded-candidate metadata ({e})") from None
    return world, parts


def parse_part(metadata: Any, path: str) -> dict[str, Any]:
    """A part file's ``twa_ray.part`` metadata."""
    if not metadata or META_PART not in metadata:
        raise ValueError(f"{path} is not a part of a sharded twa_ray candidate")
    try:
        meta: dict[str, Any] = json.loads(metadata[META_PART])
    except ValueError as e:
        raise ValueError(f"{path} has corrupt part metadata ({e})") from None
    return meta


def scatter_rows(
    full: np.ndarray, local: np.ndarray, layout: Layout, rows: Rows, into: Rows | None = None
) -> None:
    """Copy the rows ``rows`` of a local flat into ``full``: the whole ``(D,)`` vector
    (``into=None``) or another local flat holding the rows ``into`` (resharding; rows outside
    ``into`` are skipped)."""
    src = dst = 0
    for i, shape in enumerate(layout.shapes):
        rn, (a, b) = _row_numel(shape), rows[i]
        lo, hi = (a, b) if into is None else (max(a, into[i][0]), min(b, into[i][1]))
        base = layout.offsets[i] if into is None else dst - into[i][0] * rn
        if lo < hi:
            full[base + lo * rn : base + hi * rn] = local[src + (lo - a) * rn : src + (hi - a) * rn]
        src += (b - a) * rn
        if into is not None:
            dst += (into[i][1] - into[i][0]) * rn


def read_local(read_part: Any, layout: Layout, parts: list[PartInfo], rows: Rows) -> np.ndarray:
    """The local flat holding ``rows``, from the parts that overlap them (``read_part(r)``: part
    ``r``'s values, verified)."""
    out = np.empty(local_numel(layout, rows), dtype=np.float32)
    for r, part in enumerate(parts):
        if any(max(a, c) < min(b, d) for (a, b), (c, d) in zip(part.rows, rows, strict=True)):
            scatter_rows(out, read_part(r), layout, part.rows, into=rows)
    return out


def empty_batch(metadata: dict) -> pa.RecordBatch:
    """The manifest's record batch: zero values, the metadata."""
    schema = pa.schema([pa.field("flat", pa.float32(), nullable=False)]).with_metadata(metadata)
    return pa.record_batch([pa.array([], pa.float32())], schema=schema)

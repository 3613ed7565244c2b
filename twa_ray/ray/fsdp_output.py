"""The final model of a sharded run written sharded: no rank (and not the driver) holds it whole.

Every method's weights (TWA-t, TWA-v, the SWA point) end the coefficient phase as one
:math:`\\theta_r` per rank (its dim-0 rows of every parameter). The tensors are dealt to the
ranks by a greedy byte balance over the layout (:func:`owners`: largest first, to the least
loaded rank); each owner receives its tensors' rows from the other ranks one tensor at a time
(``dist.gather``, padded to the chunk size) and writes them, whole, as
``model-<r+1>-of-<W>.safetensors`` (Hugging Face's shard names, 5 digits); rank 0 adds the
buffers (the method's BatchNorm statistics) to its file and writes the index
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes},
"weight_map": {name: file}}``). The files go into the final Ray Train checkpoint (every rank's
part of one checkpoint: on the run's storage, S3 included, no shared filesystem assumed) under
``<method>/``; the driver copies the saved method's files into the outputs
(:func:`copy_output`), file by file, the index last.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from twa_ray.core.bn import load_bn_state_
from twa_ray.core.sharded import LocalShards, chunk_rows

__all__ = ["INDEX", "copy_output", "output_files", "owners", "shard_name"]

INDEX = "model.safetensors.index.json"


def shard_name(rank: int, world: int) -> str:
    """Rank ``rank``'s file of a model sharded over ``world`` ranks (Hugging Face's names)."""
    return f"model-{rank + 1:05d}-of-{world:05d}.safetensors"


def owners(nbytes: Sequence[int], world: int) -> list[int]:
    """The rank writing each tensor: largest first to the rank holding the fewest bytes so far
    (the lowest such rank on a tie).

    >>> owners([10, 40, 30, 20], 2)
    [0, 0, 1, 1]
    """
    load = [0] * world
    out = [0] * len(nbytes)
    for i in sorted(range(len(nbytes)), key=lambda i: -nbytes[i]):
        r = min(range(world), key=lambda r: load[r])
        out[i], load[r] = r, load[r] + nbytes[i]
    return out


@torch.no_grad()
def _gather_owned(
    theta: torch.Tensor, shards: LocalShards, owner: list[int], dtypes: list[torch.dtype]
) -> dict[str, torch.Tensor]:
    """The whole parameters this rank owns from every rank's ``theta`` shard, one tensor at a
    time (a collective: every rank calls it)."""
    import torch.distributed as dist

    layout, world = shards.layout, shards.world
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    out = {}
    for i, (name, shape) in enumerate(zip(layout.names, layout.shapes, strict=True)):
        chunk = -(-shape[0] // world) * shards.row_sizes[i]
        padded = torch.zeros(chunk, dtype=theta.dtype, device=device)
        local = theta[shards.offsets[i] : shards.offsets[i + 1]]
        padded[: local.numel()] = local
        if shards.rank != owner[i]:
            dist.gather(padded, None, dst=owner[i])
            continue
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.gather(padded, parts, dst=owner[i])
        rows = [chunk_rows(shape[0], world, r) for r in range(world)]
        full = torch.cat([p[: (b - a) * shards.row_sizes[i]] for p, (a, b) in zip(parts, rows)])
        out[name] = full.view(shape).to(dtypes[i]).cpu()
    return out


def output_files(
    model: nn.Module, shards: LocalShards, weights: dict[str, dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """This rank's files of every method in ``weights`` (``{method: {"theta": its shard,
    "bn_state": ...}}``): ``<method>/<shard_name>`` and, on rank 0, ``<method>/<INDEX>``; the
    persistent buffers (BN statistics loaded into ``model``) in rank 0's file; a tied parameter
    under its first name only (as :meth:`~torch.nn.Module.named_parameters` gives it, as
    ``save_pretrained`` writes it). A collective."""
    from safetensors.torch import save

    layout, rank, world = shards.layout, shards.rank, shards.world
    dtypes = [getattr(torch, d) for d in layout.dtypes]
    owner = owners([n * d.itemsize for n, d in zip(layout.sizes, dtypes, strict=True)], world)
    saved = set(model.state_dict())  # the persistent buffers (parameters are not buffers)
    files: dict[str, Any] = {}
    for method, w in weights.items():
        tensors = _gather_owned(w["theta"], shards, owner, dtypes)
        if rank == 0:
            load_bn_state_(model, w["bn_state"])
            buffers = {n: b.detach().cpu() for n, b in model.named_buffers() if n in saved}
            tensors.update(buffers)
        files[f"{method}/{shard_name(rank, world)}"] = save(tensors, {"format": "pt"})
        if rank == 0:
            files[f"{method}/{INDEX}"] = _index(layout, dtypes, buffers, owner, world)
    return files


def _index(
    layout: Any,
    dtypes: list[torch.dtype],
    buffers: dict[str, torch.Tensor],
    owner: list[int],
    world: int,
) -> dict[str, Any]:
    """The Hugging Face index of a method's files (rank 0's holds the buffers)."""
    weight_map = {n: shard_name(r, world) for n, r in zip(layout.names, owner, strict=True)}
    weight_map.update({n: shard_name(0, world) for n in buffers})
    total = sum(n * d.itemsize for n, d in zip(layout.sizes, dtypes, strict=True))
    total += sum(b.numel() * b.element_size() for b in buffers.values())
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def copy_output(checkpoint: Any, method: str, out: str) -> list[str]:
    """The saved ``method``'s files from the final ``checkpoint`` (a ``ray.train.Checkpoint``)
    into the local folder ``out``, each through a temporary name, the index last; their names."""
    import pyarrow.fs as pafs

    from twa_ray.core.atomic import atomic_path

    src = f"{checkpoint.path}/{method}"
    names = [
        os.path.basename(f.path)
        for f in checkpoint.filesystem.get_file_info(pafs.FileSelector(src))
    ]
    names = sorted(n for n in names if n != INDEX) + [INDEX]
    for name in names:
        with atomic_path(os.path.join(out, name)) as tmp:
            pafs.copy_files(
                f"{src}/{name}",
                str(tmp),
                source_filesystem=checkpoint.filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
            )
    return names

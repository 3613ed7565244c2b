"""FSDP2 on the Ray Train workers (``sampling.strategy = "fsdp"``, ``--strategy fsdp``).

The model is sharded with ``torch.distributed.fsdp.fully_shard`` on a 1-d device mesh over the
process group Ray Train created (gloo on CPU, nccl on GPU): each sub-module that holds
parameters (containers entered, modules sharing a tied parameter left to the root) is one
unit, then the root. Rank ``r`` holds dim-0 rows of every parameter
(:func:`twa_ray.store.sharded.dim0_rows`); SGD, its momentum and the EMAs live on those rows
only. Snapshots and sampling checkpoints are written per rank from the local shards
(:func:`twa_ray.store.snapshots.snapshot_shards`, :func:`shard_files`); nothing is gathered
while sampling. The sampling phase hands the coefficient phase and the driver every rank's shards
of the final weights and EMAs (:func:`shard_state` without the momentum, one file per rank): the
driver joins them from the files (:func:`join_shard_files`), no worker ever gathers the model.
The coefficient phase runs on the shards (:mod:`twa_ray.ray.fsdp_coeff`). A worker still holds
the whole model once per phase: ``build_model`` makes it full before :func:`shard_model` keeps
this rank's rows (the full parameters are freed unit by unit as they are sharded).

FSDP's forward is a collective (the all-gather of each unit's parameters): every rank must run
the same number of forwards, so evaluation pads the shorter ranks with empty batches
(:func:`even_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from twa_ray.core.ema import EMA

__all__ = [
    "LocalParams",
    "even_batches",
    "grad_l1",
    "join_shard_files",
    "load_shard_state",
    "shard_file",
    "shard_model",
    "shard_state",
]


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``, ``fully_shard``-ed per unit (see the module docstring), then the
    root; the returned module is ``model`` itself (FSDP2 shards in place)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in _units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if any(True for _ in model.buffers()):
        model.register_forward_pre_hook(_broadcast_buffers)
    return model


def _broadcast_buffers(model: nn.Module, args: Any) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every rank before a training forward, as DDP
    does (``broadcast_buffers``): the ranks evaluate with the same statistics."""
    import torch.distributed as dist

    if model.training and torch.is_grad_enabled():
        with torch.no_grad():
            for b in model.buffers():
                dist.broadcast(b, src=0)


def _units(model: nn.Module) -> list[nn.Module]:
    """The sub-modules sharded one by one: children with trainable parameters (ModuleList /
    ModuleDict entered: they have no forward; Sequential entered: its forward only calls its
    children), except those sharing a parameter with another."""

    def walk(m: nn.Module) -> Iterator[nn.Module]:
        for child in m.children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                yield from walk(child)
            elif any(p.requires_grad for p in child.parameters()):
                yield child

    units = list(walk(model))
    owners: dict[int, int] = {}
    for u in units:
        for p in u.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [u for u in units if all(owners[id(p)] == 1 for p in u.parameters())]


class LocalParams:
    """The local shards of a sharded model's parameters, as ``named_parameters()``: an
    :class:`~twa_ray.core.ema.EMA` of it is the EMA of this rank's rows (the shards' storage
    stays in place across FSDP's all-gathers and the optimizer's steps)."""

    def __init__(self, model: nn.Module) -> None:
        self._params = [(n, _local(p)) for n, p in model.named_parameters()]

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return self._params


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a plain tensor as it is)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` as a DTensor sharded like ``param`` (a plain tensor for a plain ``param``)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(
        local.to(param.device),
        param.device_mesh,
        param.placements,
        shape=param.shape,
        stride=param.stride(),
        run_check=False,
    )


def shard_file(rank: int) -> str:
    """The name of rank ``rank``'s file in a sampling checkpoint of a sharded model."""
    return f"shard-{rank:05d}.pt"


def shard_state(
    model: nn.Module, opt: torch.optim.Optimizer | None, ema: EMA | None
) -> dict[str, Any]:
    """This rank's checkpoint: the local shards of the parameters (``params``: their names), the
    buffers (this rank's BatchNorm statistics), the local momentum buffers (none without
    ``opt``) and the local EMAs (plain tensors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    momentum = {
        names[id(p)]: _local(s["momentum_buffer"]).detach().cpu()
        for p, s in (opt.state.items() if opt is not None else ())
        if s.get("momentum_buffer") is not None
    }
    return {
        "model": {n: _local(t).detach().cpu() for n, t in model.state_dict().items()},
        "params": list(names.values()),
        "momentum": momentum,
        **({"ema": ema.state_dict()} if ema is not None else {}),
    }


@torch.no_grad()
def load_shard_state(
    saved: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, ema: EMA | None
) -> None:
    """Restore :func:`shard_state` in place (the same world size)."""
    for n, t in model.state_dict().items():
        _local(t).copy_(saved["model"][n])
    for n, p in model.named_parameters():
        if n in saved["momentum"]:
            opt.state[p]["momentum_buffer"] = _like(saved["momentum"][n].clone(), p)
    if ema is not None:
        ema.load_state_dict(saved["ema"])


def join_shard_files(directory: str, world: int) -> dict[str, Any]:
    """The full model state (rank 0's buffers) and the full EMAs from the ``world`` ranks'
    :func:`shard_state` files in ``directory``: each parameter's dim-0 rows concatenated in
    rank order (FSDP2's ``Shard(0)``). On the driver, from a checkpoint's files."""
    import os

    parts = [
        torch.load(os.path.join(directory, shard_file(r)), map_location="cpu", weights_only=True)
        for r in range(world)
    ]
    params = set(parts[0]["params"])

    def join(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors) if name in params and tensors[0].dim() else tensors[0]

    first = parts[0]
    out: dict[str, Any] = {
        "model": {n: join(n, [p["model"][n] for p in parts]) for n in first["model"]}
    }
    if "ema" in first:
        sums = [[p["ema"]["sums"][i] for p in parts] for i in range(len(first["ema"]["sums"]))]
        out["ema"] = {
            **first["ema"],
            "sums": [{n: join(n, [s[n] for s in per]) for n in per[0]} for per in sums],
        }
    return out


def shard_files_world(directory: str) -> int:
    """The ranks whose :func:`shard_state` files ``directory`` holds (0: none)."""
    import os

    world = 0
    while os.path.exists(os.path.join(directory, shard_file(world))):
        world += 1
    return world


def grad_l1(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L1 norm of the whole gradient from every rank's shards (one all-reduced scalar):
    non-finite on every rank as soon as one rank's shard is."""
    import torch.distributed as dist

    local = [_local(g) for g in grads]
    total = torch.nn.utils.get_total_norm(local, norm_type=1.0) if local else torch.zeros(())
    dist.all_reduce(total)
    return total


def even_batches(loader: Iterable[Any], num_examples: int, world: int, batch: int) -> Iterable[Any]:
    """``loader`` over this rank's strided shard of ``num_examples``, padded with empty batches
    to the count of rank 0's (the largest shard): every rank runs as many forwards."""
    count = math.ceil(math.ceil(num_examples / world) / batch)
    return _Padded(loader, count)


class _Padded:
    def __init__(self, loader: Iterable[Any], count: int) -> None:
        self.loader, self.count = loader, count

    def __iter__(self) -> Iterator[Any]:
        done, first = 0, None
        for x, y in self.loader:
            first = (x, y) if first is None else first
            done += 1
            yield x, y
        if first is None and done < self.count:
            raise ValueError("an evaluation shard is empty while another rank's is not")
        for _ in range(done, self.count):
            assert first is not None
            yield first[0][:0], first[1][:0]


def min_batches(num_examples: int, world: int, batch: int) -> int:
    """The batches of the smallest rank's strided shard of ``num_examples``: a BatchNorm
    re-estimation runs that many forwards on every rank (an empty batch cannot train BN)."""
    return -(-(num_examples // world) // batch)

"""TWA on an FSDP2-sharded model: every rank learns the same alpha from its own shards.

The coefficient step of :class:`~twa_ray.core.twa.TWA` with a
:class:`~twa_ray.core.sharded_subspace.ShardedSubspace` in place of a placement:

.. math::
    g_r = \\text{rank } r\\text{'s gradient shard (FSDP2 reduce-scatter: the batch mean)}, \\quad
    a = \\textstyle\\sum_r B_r g_r, \\quad
    \\alpha \\leftarrow \\mathrm{step}(\\alpha, a), \\quad
    \\theta_r = o_r + B_r^\\top \\alpha

alpha, the optimizer and the schedule are TWA's own (the same on every rank, as ``a`` is);
only where theta and g live changes: the ranks' local DTensor shards, never gathered.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from twa_ray.core.bn import reestimate_bn
from twa_ray.core.sharded import LocalShards, load_local_flat_, local_grad
from twa_ray.core.sharded_span import build_span_sharded
from twa_ray.core.sharded_subspace import ShardedSubspace, build_affine_sharded
from twa_ray.core.subspace import CandidateStream
from twa_ray.core.twa import TWA, TWAConfig

__all__ = ["ShardedTWA", "build_sharded_subspace", "local_stream"]


def local_stream(candidates: Any, shards: LocalShards) -> CandidateStream:
    """This rank's candidate shards (D_r,) as a re-iterable stream: from a store (anything with
    ``names()`` and ``read_local(name, rank, world)``: only the parts holding the rank's rows are
    read, in the store's order), or ``candidates`` as it is (a stream already)."""
    if not hasattr(candidates, "read_local"):
        return candidates
    names = candidates.names()
    rank, world = shards.rank, shards.world
    return lambda: (candidates.read_local(n, rank, world).float() for n in names)


def build_sharded_subspace(
    candidates: Any,
    shards: LocalShards,
    config: TWAConfig,
    *,
    group: dist.ProcessGroup | None = None,
) -> ShardedSubspace:
    """This rank's part of the subspace named by ``config`` (as
    :func:`~twa_ray.core.twa.build_subspace`) from its candidate shards (D_r,): a store or a
    stream (:func:`local_stream`)."""
    candidates = local_stream(candidates, shards)
    if config.subspace == "span":
        return build_span_sharded(candidates, shards, bits=config.bits, group=group)
    return build_affine_sharded(
        candidates,
        shards,
        blocks=shards.layout.blocks(config.blocks),
        bits=config.bits,
        granularity=config.granularity,
        group=group,
    )


class ShardedTWA(TWA):
    """:class:`~twa_ray.core.twa.TWA` for a ``fully_shard``-ed ``model`` and this rank's
    :class:`~twa_ray.core.sharded_subspace.ShardedSubspace` (built by
    :func:`build_sharded_subspace`). Every rank of the mesh calls
    every method (forward, backward and ``mean_grad`` are collectives); :attr:`theta` is this
    rank's shard of the weights, (D_r,) float32."""

    placement: ShardedSubspace

    def _place(self, candidates: Any) -> ShardedSubspace:
        if not isinstance(candidates, ShardedSubspace):
            raise ValueError(
                f"ShardedTWA takes a ShardedSubspace (build_affine_sharded), got "
                f"{type(candidates).__name__}; use TWA for a model that is not sharded"
            )
        shards = LocalShards.from_module(self.model)
        if shards != candidates.shards:
            raise ValueError(
                f"the subspace holds rank {candidates.shards.rank} of {candidates.shards.world}'s "
                f"shards of another layout or mesh than this model's (rank {shards.rank} of "
                f"{shards.world}); build it from this model's LocalShards"
            )
        return candidates

    def _bind_flat_params(self) -> None:
        """FSDP2 owns the local shards' storage: theta is copied into it (load_theta_)."""
        return None

    @torch.no_grad()
    def load_theta_(self) -> None:
        """Write this rank's shard of ``theta(alpha)`` into the model's local shards."""
        load_local_flat_(self.model, self.theta, self.placement.shards)

    def _grad(self) -> torch.Tensor:
        return local_grad(self.model)

    def update_bn(self, loader: Iterable[Any], **kw: Any) -> int:
        """Re-estimate BatchNorm statistics over all ranks' batches (every rank calls it, with
        its own batches); returns the number of statistics (floats) set."""
        return int(reestimate_bn(self.model, loader, device=self.device, **kw).numel())

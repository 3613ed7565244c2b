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

from twa_ray.core.bn import reestimate_bn
from twa_ray.core.sharded import LocalShards, load_local_flat_, local_grad
from twa_ray.core.sharded_subspace import ShardedSubspace
from twa_ray.core.twa import TWA

__all__ = ["ShardedTWA"]


class ShardedTWA(TWA):
    """:class:`~twa_ray.core.twa.TWA` for a ``fully_shard``-ed ``model`` and this rank's
    :class:`~twa_ray.core.sharded_subspace.ShardedSubspace` (built by
    :func:`~twa_ray.core.sharded_subspace.build_affine_sharded`). Every rank of the mesh calls
    every method (forward, backward and ``mean_grad`` are collectives)."""

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

    @property
    def theta(self) -> torch.Tensor:
        """This rank's coordinates of ``o + sum alpha B``, (D_r,) float32 (no communication)."""
        return self.placement.reconstruct(self.alpha)

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

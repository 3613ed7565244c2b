"""The tiny model and batches of the FSDP2 ``snapshot`` / ``learn`` tests: the gloo test
(tests/integrations/test_learn_sharded.py) and the Ray Train loop on the cluster
(tests/cluster/fsdp_loop_job.py)."""

from __future__ import annotations

import torch
from torch import nn

BATCH = 4  # rows a rank's batch


def make_model() -> nn.Module:
    """Dim-0 sizes 7 and 3: uneven shards at W = 2 and 3."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step``: a function of both alone."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 5, generator=g), torch.randint(0, 3, (BATCH,), generator=g)

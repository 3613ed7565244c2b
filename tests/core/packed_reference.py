"""float64 references for the packed-matrix tests (shared by test_quant.py and test_project.py)."""

import torch

from twa_ray.core.layout import Blocks
from twa_ray.core.quant import PackedMatrix


def blocks_of(*sizes: int) -> Blocks:
    """Consecutive blocks of the given sizes."""
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    return Blocks(tuple(bounds), tuple(f"b{i}" for i in range(len(sizes))))


def dequantize64(pm: PackedMatrix) -> torch.Tensor:
    """float64 ``scale * q + zero`` from the packed bytes, decoded bit by bit in Python terms."""
    cols = []
    for blk, (a, b) in enumerate(zip(pm.bounds, pm.bounds[1:])):
        if pm.bits > 8:
            cols.append(pm.data[:, a:b].double())
            continue
        raw = pm.data[:, pm.byte_bounds[blk] : pm.byte_bounds[blk + 1]].long()
        j, per = torch.arange(b - a), 8 // pm.bits
        q = (raw[:, j // per] >> ((j % per) * pm.bits)) & ((1 << pm.bits) - 1)
        cols.append(
            q.double() * pm.scale[:, blk : blk + 1].double() + pm.zero[:, blk : blk + 1].double()
        )
    return torch.cat(cols, dim=1)

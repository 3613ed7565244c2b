"""Multi-layer perceptron with BatchNorm, the MNIST-1D baseline of bench/claims.py (2 x 256; bench/RESULTS.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``Flatten -> [Linear -> BatchNorm1d -> ReLU] x len(hidden) -> Linear``.

    Args:
        in_features: size of the flattened input (40 for MNIST-1D).
        num_classes: number of output logits.
        hidden: widths of the hidden layers (default two of 256).

    >>> MLP(40, 10)(torch.randn(8, 40)).shape
    torch.Size([8, 10])
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            # the Linear bias is redundant before BN (BN's shift replaces it)
            layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, num_classes)

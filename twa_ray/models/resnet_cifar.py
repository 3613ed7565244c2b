"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", https://arxiv.org/abs/1512.03385, sec. 4.2).

Depth 6n+2: a 3x3 conv (16 channels), three stages of n basic blocks with 16, 32 and
64 channels (stride 2 at the start of stages 2 and 3), global average pooling and a
linear classifier. ResNet-20 (n = 3) has 0.27M parameters with the paper's option A
shortcut (parameter-free: subsample by 2 and zero-pad the new channels); option B
uses a 1x1 conv + BN projection where the shape changes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNetCifar", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]

Shortcut = Literal["A", "B"]


class _PadShortcut(nn.Module):
    """Option A: ``x[:, :, ::2, ::2]`` zero-padded from ``c_in`` to ``c_out`` channels."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.pad, self.stride = c_out - c_in, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        lo = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: Shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.shortcut = _PadShortcut(c_in, c_out, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 images.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110).
        num_classes: number of output logits.
        in_channels: image channels (3).
        shortcut: ``"A"`` (zero-padding identity, the paper's CIFAR choice) or ``"B"`` (1x1 conv).

    >>> sum(p.numel() for p in ResNetCifar(20, 10).parameters())
    269722
    """

    def __init__(
        self, depth: int, num_classes: int, *, in_channels: int = 3, shortcut: Shortcut = "A"
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, shortcut))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(
                    m.weight,
                    mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                    nonlinearity="relu",
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (N, 16, H, W)
        out = self.layers(out)  # (N, 64, H/4, W/4)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, 64)
        return self.fc(out)


def resnet20(
    num_classes: int = 10, *, in_channels: int = 3, shortcut: Shortcut = "A"
) -> ResNetCifar:
    """ResNet-20 for CIFAR."""
    return ResNetCifar(20, num_classes, in_channels=in_channels, shortcut=shortcut)


def resnet32(
    num_classes: int = 10, *, in_channels: int = 3, shortcut: Shortcut = "A"
) -> ResNetCifar:
    """ResNet-32 for CIFAR."""
    return ResNetCifar(32, num_classes, in_channels=in_channels, shortcut=shortcut)


def resnet44(
    num_classes: int = 10, *, in_channels: int = 3, shortcut: Shortcut = "A"
) -> ResNetCifar:
    """ResNet-44 for CIFAR."""
    return ResNetCifar(44, num_classes, in_channels=in_channels, shortcut=shortcut)


def resnet56(
    num_classes: int = 10, *, in_channels: int = 3, shortcut: Shortcut = "A"
) -> ResNetCifar:
    """ResNet-56 for CIFAR."""
    return ResNetCifar(56, num_classes, in_channels=in_channels, shortcut=shortcut)


def resnet110(
    num_classes: int = 10, *, in_channels: int = 3, shortcut: Shortcut = "A"
) -> ResNetCifar:
    """ResNet-110 for CIFAR."""
    return ResNetCifar(110, num_classes, in_channels=in_channels, shortcut=shortcut)

"""VGG-16 with BatchNorm for 32x32 images, as in the SWA / TWA CIFAR experiments.

13 conv3x3-BN-ReLU layers in five max-pooled stages (64, 128, 256, 512, 512
channels) reduce a 32x32 image to a 512-d vector; the classifier is
``Dropout -> Linear(512, 512) -> ReLU -> Dropout -> Linear(512, 512) -> ReLU -> Linear(512, C)``
(timgaripov/swa ``VGG16BN``, used by nblt/TWA). About 15.3M parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["VGG16BN", "VGG16_CFG"]

VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG16BN(nn.Module):
    """VGG-16-BN for CIFAR. Inputs larger than 32x32 are average-pooled to 1x1 after the convs.

    >>> VGG16BN(10)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int, *, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(c_in, v, 3, padding=1),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # identity for 32x32 inputs (already 1x1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the SWA repo's init
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                assert m.bias is not None
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (N, 512)
        return self.classifier(x)

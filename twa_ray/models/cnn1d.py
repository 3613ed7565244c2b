"""A small 1-D CNN for MNIST-1D (sequences of length 40)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CNN1d"]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    ]


class CNN1d(nn.Module):
    """Three Conv1d-BN-ReLU layers (length 40 -> 20 -> 10), then a linear classifier.

    The features are flattened, not pooled: in MNIST-1D *where* a bump sits carries the
    class. Input ``(N, L)`` (one channel, e.g. MNIST-1D) or ``(N, C, L)``.

    Args:
        input_shape: ``(L,)`` or ``(C, L)``.
        num_classes: number of output logits.
        channels: widths of the three conv layers.

    >>> CNN1d((40,), 10)(torch.randn(8, 40)).shape
    torch.Size([8, 10])
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64, 64)
    ):
        super().__init__()
        if len(input_shape) not in (1, 2):
            raise ValueError(
                f"cnn1d (the default model, for 1-D sequences such as MNIST-1D) takes input_shape "
                f"(L,) or (C, L), got {tuple(input_shape)}; for images pass --model resnet20, "
                "--model tv:<torchvision name> or --model mlp"
            )
        c_in = 1 if len(input_shape) == 1 else int(input_shape[0])
        length = int(input_shape[-1])
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            *_conv_bn(c_in, c1, 5, 1),
            *_conv_bn(c1, c2, 3, 2),  # L -> ceil(L/2)
            *_conv_bn(c2, c3, 3, 2),  # -> ceil(L/4)
        )
        out_len = (((length + 1) // 2) + 1) // 2  # ceil(ceil(L/2)/2)
        self.classifier = nn.Linear(c3 * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (N, L) -> (N, 1, L)
        h = self.features(x)  # (N, c3, ceil(L/4))
        return self.classifier(h.flatten(1))  # (N, num_classes)

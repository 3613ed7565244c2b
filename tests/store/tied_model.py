"""BYO models for the tied-weight tests (``--model tied_model:build`` with tests/store on the path).

``build``: GPT-2-style weight tying, the output layer is the class embedding
(``lm_head.weight = wte.weight``). ``build_view``: a buffer that is a slice of another (BatchNorm's
running mean, updated in place), which no safetensors file can hold.
"""

import torch
from torch import nn


class Tied(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(num_classes, width)  # registered first: named_parameters() names it
        self.body = nn.Sequential(
            nn.Linear(input_shape[0], width), nn.BatchNorm1d(width), nn.ReLU()
        )
        self.lm_head = nn.Linear(width, num_classes, bias=False)
        self.lm_head.weight = (
            self.wte.weight
        )  # tied (save_model keeps lm_head.weight, sorted first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(x))


def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return Tied(num_classes, input_shape)


def build_view(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    model = Tied(num_classes, input_shape)
    model.register_buffer("mean_head", model.body[1].running_mean[:4])  # a view: not storable
    return model

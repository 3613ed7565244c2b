"""``build_model(name, ...)``: the one entry point from a model name to an ``nn.Module``."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from twa_ray.importpath import call_with_accepted, is_import_path, load_callable
from twa_ray.models.cnn1d import CNN1d
from twa_ray.models.mlp import MLP
from twa_ray.models.resnet_cifar import ResNetCifar
from twa_ray.models.vgg import VGG16BN

__all__ = ["MODELS", "build_model"]


def _image_channels(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{name} takes images, input_shape (C, H, W); got {input_shape}")
    return input_shape[0]


def _resnet(depth: int) -> Callable[[int, tuple[int, ...]], nn.Module]:
    def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        c = _image_channels(f"resnet{depth}", input_shape)
        return ResNetCifar(depth, num_classes, in_channels=c)

    return build


MODELS: dict[str, Callable[[int, tuple[int, ...]], nn.Module]] = {
    "mlp": lambda num_classes, input_shape: MLP(math.prod(input_shape), num_classes),
    "cnn1d": lambda num_classes, input_shape: CNN1d(input_shape, num_classes),
    **{f"resnet{d}": _resnet(d) for d in (20, 32, 44, 56, 110)},
    "vgg16_bn": lambda num_classes, input_shape: VGG16BN(
        num_classes, in_channels=_image_channels("vgg16_bn", input_shape)
    ),
}
"""Built-in models: name -> ``builder(num_classes, input_shape)``."""


def _check_forward(
    model: nn.Module, name: str, shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """One forward pass of two zero inputs (eval mode, no grad): a model that does not fit the
    data's input shape or class count is one ``ValueError`` now, not a traceback mid-training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as e:  # shape mismatches surface as RuntimeError (or ValueError) from torch
        first = " ".join(str(e).split())[:200]
        raise ValueError(
            f"model {name!r} does not accept the data's inputs of shape {list(shape)} ({first}); "
            "build it for the input_shape it is given, or pick the --dataset it was made for"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model {name!r} returns {got} for a batch of 2, expected [2, {num_classes}] logits; "
            "build it with the num_classes it is given"
        )
    return model


def build_model(name: str, *, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """Build a freshly initialized classifier (parameters drawn from the global torch RNG).

    Args:
        name: one of

            - ``"mlp"``: 2 x 256 hidden, Linear-BatchNorm1d-ReLU (the MNIST-1D baseline);
            - ``"cnn1d"``: 3 Conv1d-BN-ReLU layers + linear, for MNIST-1D (``(N, 40)`` inputs);
            - ``"resnet20"`` (also 32/44/56/110): CIFAR ResNet, option A shortcut (0.27M params);
            - ``"vgg16_bn"``: CIFAR VGG-16 with BN and a 512-512 classifier (15.3M params);
            - ``"hf:<folder>"``: the ``transformers`` architecture of ``<folder>/config.json``
              (fresh weights, nothing downloaded), called as ``model(x).logits``;
            - ``"tv:<name>"``: ``torchvision.models.get_model(name, weights=None, num_classes=...)``;
            - ``"pkg.module:function"``: a user function, called with ``num_classes=`` and
              ``input_shape=`` if its signature accepts them (each on its own), else with none.
        num_classes: number of output logits.
        input_shape: shape of one input without the batch dimension: ``(40,)``, ``(3, 32, 32)``.

    Raises:
        ValueError: unknown name (the message lists the choices) or incompatible shape.

    >>> build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))  # doctest: +ELLIPSIS
    ResNetCifar(...)
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}"
        )
    if name in MODELS:
        return MODELS[name](num_classes, shape)
    if isinstance(name, str) and name.startswith("hf:"):
        from twa_ray.store.hf import build_model as build_hf

        return _check_forward(build_hf(name[3:]), name, shape, num_classes)
    if isinstance(name, str) and name.startswith("tv:"):
        return _check_forward(_torchvision_model(name[3:], num_classes), name, shape, num_classes)
    if isinstance(name, str) and is_import_path(name):
        model = call_with_accepted(
            load_callable(name), {"num_classes": num_classes, "input_shape": shape}
        )
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model function {name!r} returned {type(model).__name__}, not an nn.Module"
            )
        return _check_forward(model, name, shape, num_classes)
    raise ValueError(
        f"unknown model {name!r}; choose one of {', '.join(MODELS)}, 'tv:<torchvision model>' "
        "(e.g. 'tv:resnet18'), 'hf:<Hugging Face model folder>' or a user function 'package.module:function'"
    )


def _torchvision_model(tv_name: str, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    available = tvm.list_models()
    if tv_name not in available:
        close = difflib.get_close_matches(tv_name.lower(), available, n=5, cutoff=0.6)
        raise ValueError(
            f"unknown torchvision model {tv_name!r}"
            + (f"; did you mean one of {close}?" if close else "")
            + " (torchvision.models.list_models() lists all)"
        )
    return tvm.get_model(tv_name, weights=None, num_classes=num_classes)

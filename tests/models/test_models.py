"""Model zoo: shapes, parameter counts, torchvision and user models, and a training sanity check."""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from torch import nn
from torch.utils.data import TensorDataset

from twa_ray.data import DataSplits, load_dataset
from twa_ray.models import MODELS, ResNetCifar, build_model


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "name,input_shape,num_classes,params",
    [
        ("mlp", (40,), 10, 79_370),
        ("cnn1d", (40,), 10, 25_322),
        ("resnet20", (3, 32, 32), 10, 269_722),  # He et al.: 0.27M
        ("resnet32", (3, 32, 32), 10, 464_154),  # 0.46M
        ("vgg16_bn", (3, 32, 32), 100, 15_299_748),
    ],
)
def test_builtin_models(
    name: str, input_shape: tuple[int, ...], num_classes: int, params: int
) -> None:
    torch.manual_seed(0)
    m = build_model(name, num_classes=num_classes, input_shape=input_shape)
    assert _num_params(m) == params
    x = torch.randn(4, *input_shape)
    assert m(x).shape == (4, num_classes)  # train mode (BN batch statistics)
    m.eval()
    with torch.no_grad():
        out = m(x[:1])  # eval mode works on a batch of one
    assert out.shape == (1, num_classes) and torch.isfinite(out).all()
    assert any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    torch.manual_seed(0)  # same seed, same initialization
    m2 = build_model(name, num_classes=num_classes, input_shape=input_shape)
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), m.parameters()))


def test_resnet_shortcut_b_and_channels() -> None:
    m = ResNetCifar(20, 10, shortcut="B")
    assert _num_params(m) == 272_474
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    g = build_model("resnet20", num_classes=5, input_shape=(1, 28, 28))  # grayscale, other size
    assert g(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNetCifar(21, 10)


def test_cnn1d_accepts_channels() -> None:
    m = build_model("cnn1d", num_classes=3, input_shape=(2, 33))
    assert m(torch.randn(5, 2, 33)).shape == (5, 3)


def test_torchvision_model() -> None:
    m = build_model("tv:resnet18", num_classes=7, input_shape=(3, 64, 64))
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert 11_000_000 < _num_params(m) < 11_300_000
    with pytest.raises(ValueError, match="resnet18"):
        build_model("tv:resnet_18", num_classes=7, input_shape=(3, 64, 64))


def test_bad_names_and_shapes() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet21'") as e:
        build_model("resnet21", num_classes=10, input_shape=(3, 32, 32))
    assert all(name in str(e.value) for name in MODELS) and "tv:" in str(e.value)
    with pytest.raises(ValueError, match="input_shape \\(C, H, W\\)"):
        build_model("resnet20", num_classes=10, input_shape=(40,))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", num_classes=0, input_shape=(40,))


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    code = """
        from torch import nn

        def with_args(num_classes, input_shape):
            return nn.Linear(input_shape[0], num_classes)

        def only_classes(num_classes):
            return nn.Linear(4, num_classes)

        def no_args():
            return nn.Linear(4, 2)

        def not_a_module(num_classes):
            return "linear"
    """
    (tmp_path / "my_user_models.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_user_models"
    sys.modules.pop("my_user_models", None)


def test_user_model(user_models: str) -> None:
    m = build_model(f"{user_models}:with_args", num_classes=3, input_shape=(6,))
    assert isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (6, 3)
    assert (
        build_model(f"{user_models}:only_classes", num_classes=5, input_shape=(4,)).out_features
        == 5
    )
    assert build_model(f"{user_models}:no_args", num_classes=2, input_shape=(4,)).out_features == 2
    # a model that does not fit the data is one error at build time, not a traceback mid-run
    with pytest.raises(ValueError, match=r"does not accept the data's inputs of shape \[9\]"):
        build_model(f"{user_models}:only_classes", num_classes=5, input_shape=(9,))
    with pytest.raises(ValueError, match=r"expected \[2, 5\] logits"):
        build_model(f"{user_models}:no_args", num_classes=5, input_shape=(4,))
    with pytest.raises(ValueError, match="not an nn.Module"):
        build_model(f"{user_models}:not_a_module", num_classes=5, input_shape=(9,))
    with pytest.raises(ValueError, match="no attribute"):
        build_model(f"{user_models}:missing", num_classes=5, input_shape=(9,))


# --------------------------------------------------------------------------- training sanity


@pytest.fixture(scope="module")
def mnist1d(mnist1d_cache: Path) -> DataSplits:
    return load_dataset("mnist1d", root=mnist1d_cache)  # shared with tests/data: generated once


def test_mlp_learns_mnist1d(mnist1d: DataSplits) -> None:
    """3 epochs of cosine SGD (batch 128, lr 0.1, momentum 0.9, wd 5e-4): > 60% test accuracy."""
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=mnist1d.num_classes, input_shape=mnist1d.input_shape)
    assert isinstance(mnist1d.train, TensorDataset) and isinstance(mnist1d.test, TensorDataset)
    x, y = mnist1d.train.tensors
    x_test, y_test = mnist1d.test.tensors
    epochs, batch = 3, 128
    total = epochs * math.ceil(len(y) / batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
    _train(model, x, y, opt, sched, epochs=epochs, batch=batch)
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert acc > 0.6, acc


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    *,
    epochs: int,
    batch: int,
) -> None:
    steps_per_epoch = math.ceil(len(y) / batch)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

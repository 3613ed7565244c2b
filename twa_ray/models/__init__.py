"""Model zoo: ``build_model(name, num_classes=..., input_shape=...)``.

Built in: ``"mlp"``, ``"cnn1d"`` (MNIST-1D), ``"resnet20"`` (and 32/44/56/110), ``"vgg16_bn"``
(CIFAR); any torchvision classifier as ``"tv:<name>"``; a user function as
``"pkg.module:function"``.
"""

from twa_ray.models.cnn1d import CNN1d
from twa_ray.models.mlp import MLP
from twa_ray.models.registry import MODELS, build_model
from twa_ray.models.resnet_cifar import ResNetCifar, resnet20
from twa_ray.models.vgg import VGG16BN

__all__ = ["CNN1d", "MLP", "MODELS", "VGG16BN", "ResNetCifar", "build_model", "resnet20"]

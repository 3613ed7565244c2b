"""Tiny local Hugging Face models and data for the integration tests (nothing downloaded)."""

import torch
from torch.utils.data import TensorDataset

IMAGE = (3, 8, 8)
NUM_CLASSES = 3


def vit(seed: int = 0):
    """A 2-layer ViT classifier of hidden size 32 on 8x8 images (~26k parameters)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=NUM_CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def images(seed: int = 0, n: int = 96):
    """``--dataset tests.integrations.tiny_hf:images``: random 8x8 images, labels from their
    mean colour channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *IMAGE, generator=g)
    y = x.mean(dim=(2, 3)).argmax(1)
    k = n // 3
    return {
        "train": TensorDataset(x[:k], y[:k]),
        "val": TensorDataset(x[k : 2 * k], y[k : 2 * k]),
        "test": TensorDataset(x[2 * k :], y[2 * k :]),
        "num_classes": NUM_CLASSES,
    }

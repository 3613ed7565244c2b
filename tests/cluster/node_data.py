"""A user dataset for the multi-node tests: MNIST-1D behind a ``root`` that must exist."""

from twa_ray.data import load_dataset


def splits(root, num_samples=1500):
    return load_dataset("mnist1d", num_samples=num_samples)

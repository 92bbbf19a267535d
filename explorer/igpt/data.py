"""Fashion-MNIST for the iGPT: the project's one reader (`explorer.datasets`) as tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from explorer.datasets import FASHION_MNIST_CLASSES as CLASS_NAMES
from explorer.datasets import DatasetError as DatasetUnavailableError
from explorer.datasets import read_fashion_mnist

__all__ = ["CLASS_NAMES", "DatasetUnavailableError", "load_fashion_mnist"]


def load_fashion_mnist(split: str = "test", root: str | Path | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns images (N, 28, 28) uint8 and labels (N,) int64; N = 60000 train / 10000 test.
    ``root``: the folder of the IDX files (default `explorer.datasets.fashion_mnist_dir`).

    Raises:
        DatasetUnavailableError: the Debian package `dataset-fashion-mnist` is not installed.
    """
    images, labels = read_fashion_mnist(split, root)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)

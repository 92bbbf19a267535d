"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, gzip)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": "train", "test": "t10k"}


class DatasetUnavailableError(FileNotFoundError):
    """The Fashion-MNIST files are not installed; the message says how to get them."""


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(split: str = "test", root: str | Path = FASHION_MNIST_DIR
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns images (N, 28, 28) uint8 and labels (N,) int64; N = 60000 train / 10000 test."""
    root = Path(root)
    prefix = _FILES[split]
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lbl_path.exists():
        raise DatasetUnavailableError(
            f"Fashion-MNIST is not installed at {root} (install the Debian package "
            "`dataset-fashion-mnist`: apt-get install dataset-fashion-mnist).")
    images = _read_idx(img_path, 16).reshape(-1, 28, 28)  # header: magic, n, rows, cols
    labels = _read_idx(lbl_path, 8)  # header: magic, n
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))

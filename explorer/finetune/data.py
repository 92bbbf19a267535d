"""From an `ImageSet` to model input: resized, normalised pixels with labels and indices."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from explorer.datasets import ImageSet
from explorer.images import prepare_pixels


class PixelDataset(Dataset):
    """Items ``(pixels (3, H, W), label, index)`` at a fixed training resolution.

    The index travels with each item so results gathered from several processes (or a
    shuffled loader) can be put back in dataset order.

    Args:
        images: the labelled images.
        data_config: timm data config of the model (``mean``, ``std``).
        size: (height, width) in pixels, multiples of the patch size.
        augment: random horizontal flips (training only; cheap and label-preserving for
            photos and clothes; turn off for data where left/right matters).
    """

    def __init__(self, images: ImageSet, data_config: dict, size: tuple[int, int],
                 augment: bool = False):
        self.images = images
        self.data_config = data_config
        self.size = size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        pixels = prepare_pixels(self.images.image(index), self.data_config, self.size)[0]
        if self.augment and torch.rand(()) < 0.5:  # global torch RNG: seeded by set_seed
            pixels = pixels.flip(-1)
        return pixels, int(self.images.labels[index]), index


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process loader (the CPU is better spent on the model) with a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=0, drop_last=False)

"""Training at a resolution other than the native one, with interpolated position embeddings.

As in ViT (Dosovitskiy et al., 2021, section 3.2): fine-tune at a new resolution by keeping
the patch size, so the grid changes, and 2-D interpolating the learned position embeddings
to the new grid. Here the interpolation is made permanent (`set_resolution`), so the
embeddings at the new grid are what gets trained and saved.
"""

from __future__ import annotations

import torch

from explorer.images import snap_to_patch
from explorer.patches import patch_position_embedding, patch_size, position_similarity


def native_resolution(model: torch.nn.Module) -> tuple[int, int]:
    """(height, width) the model's position embeddings were made for."""
    return tuple(int(s) for s in model.patch_embed.img_size)


def snap_resolution(model: torch.nn.Module, side: int | None) -> tuple[int, int]:
    """A square (side, side) snapped to the patch size; None = the native resolution."""
    if side is None:
        return native_resolution(model)
    ph, pw = patch_size(model)
    return snap_to_patch(int(side), ph), snap_to_patch(int(side), pw)


def set_resolution(model: torch.nn.Module, size: tuple[int, int]) -> bool:
    """Resample the position embeddings to the grid of ``size`` (bicubic, timm's own).

    ``model.patch_embed.img_size`` becomes ``size``; saved checkpoints record it.

    Returns:
        True if the grid changed.
    """
    size = tuple(int(s) for s in size)
    if size == native_resolution(model):
        return False
    model.set_input_size(img_size=size)
    return True


def position_similarity_map(model: torch.nn.Module) -> torch.Tensor:
    """Cosine similarity between the position embeddings of the model's current grid.

    Returns:
        (rows, cols, rows, cols): entry [i, j] is patch (i, j)'s similarity map.
    """
    return position_similarity(patch_position_embedding(model))

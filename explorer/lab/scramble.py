"""The wrong-bias experiment's data: Fashion-MNIST with its patches and pixels shuffled.

One fixed random permutation of the 7×7 patch positions and one fixed permutation of the 16
pixels inside every 4×4 patch, the same for every image, training and test alike, applied
after augmentation (so the scrambled task is the original one up to a relabelling of pixels).

A ViT with learned absolute position embeddings, a linear patch embedding and mean pooling is
exactly indifferent to this: permute its position embeddings and its patch projection's inputs
(`permute_vit`) and it computes on scrambled images what it computed on the originals. A CNN's
locality and a relative-position bias, by contrast, now assume neighbourhoods that are not
there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from explorer.patches import grid_for, patch_size


@dataclass(frozen=True)
class Scramble:
    """Where each scrambled pixel comes from.

    Attributes:
        positions: (gh·gw,) scrambled patch position q holds the original patch positions[q]
            (row-major on the patch grid).
        pixels: (p·p,) pixel j of every scrambled patch is pixel pixels[j] of its original
            patch (row-major inside the patch).
        patch: the patch side p in pixels.
    """

    positions: torch.Tensor
    pixels: torch.Tensor
    patch: int


def make_scramble(image_size: int = 28, patch: int = 4, seed: int = 0) -> Scramble:
    """The fixed scramble of ``image_size``-px images cut in ``patch``-px patches."""
    if image_size % patch:
        raise ValueError(f"{image_size} px is not a whole number of {patch}-px patches.")
    g = torch.Generator().manual_seed(seed)
    cells = (image_size // patch) ** 2
    return Scramble(torch.randperm(cells, generator=g), torch.randperm(patch * patch, generator=g),
                    patch)


def _patches(images: torch.Tensor, p: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(..., H, W) → (..., gh·gw, p·p) patches (row-major), and the shape to fold back."""
    *lead, H, W = images.shape
    gh, gw = H // p, W // p
    x = images.reshape(*lead, gh, p, gw, p).movedim(-3, -2)  # (..., gh, gw, p, p)
    return x.reshape(*lead, gh * gw, p * p), (*lead, gh, gw, p, p)


def _fold(patches: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    *lead, gh, gw, p, _ = shape
    return patches.reshape(shape).movedim(-2, -3).reshape(*lead, gh * p, gw * p)


def scramble_images(images: torch.Tensor, s: Scramble) -> torch.Tensor:
    """(..., H, W) images (any dtype) → the same images scrambled by ``s``."""
    x, shape = _patches(images, s.patch)
    return _fold(x[..., s.positions, :][..., s.pixels], shape)


def unscramble_images(images: torch.Tensor, s: Scramble) -> torch.Tensor:
    """The inverse of `scramble_images`."""
    x, shape = _patches(images, s.patch)
    return _fold(x[..., s.positions.argsort(), :][..., s.pixels.argsort()], shape)


def permute_vit(model: nn.Module, s: Scramble) -> nn.Module:
    """A copy of a timm ViT (learned absolute positions, linear patch embedding, no
    relative bias) that computes on ``scramble_images(x)`` exactly what ``model`` computes on
    ``x``: its patch projection reads each pixel where the scramble put it, and each position
    embedding moves with its patch.

    Raises:
        ValueError: the model's patch size differs from the scramble's, or it has no
            position embedding to permute.
    """
    if patch_size(model) != (s.patch, s.patch):
        raise ValueError(f"The model's patches are {patch_size(model)}, the scramble's "
                         f"{s.patch}×{s.patch}.")
    if getattr(model, "pos_embed", None) is None:
        raise ValueError("This model has no absolute position embedding to permute.")
    out = copy.deepcopy(model)
    prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
    grid = model.patch_embed.grid_size
    if len(s.positions) != grid[0] * grid[1]:
        raise ValueError(f"The scramble spans {len(s.positions)} patches, the model "
                         f"{grid_for((grid[0] * s.patch, grid[1] * s.patch), (s.patch,) * 2)}.")
    with torch.no_grad():
        w = model.patch_embed.proj.weight  # (D, C, p, p)
        flat = w.reshape(*w.shape[:2], -1)  # (D, C, p·p)
        out.patch_embed.proj.weight.copy_(flat[..., s.pixels].reshape(w.shape))
        pos = model.pos_embed  # (1, prefix + gh·gw, D)
        out.pos_embed[:, prefix:].copy_(pos[:, prefix:][:, s.positions])
    return out

"""Patch tokenisation, made inspectable: "an image is worth 16x16 words".

Everything here reads the geometry from the model (``patch_embed.patch_size``,
``num_prefix_tokens``, ``pos_embed``), so it works for 14 and 16 px patches, class,
distillation and register tokens, and any (height, width) multiple of the patch size.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from explorer.cache import KeyedCache


def patch_size(model: torch.nn.Module) -> tuple[int, int]:
    """(height, width) of one patch in pixels."""
    ph, pw = model.patch_embed.patch_size
    return int(ph), int(pw)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live: analyses create their tensors there."""
    return next(model.parameters()).device


def grid_for(size: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (rows, cols) for an input of ``size`` = (height, width) pixels."""
    return size[0] // patch[0], size[1] // patch[1]


def has_class_token(model: torch.nn.Module) -> bool:
    """Whether the model's first token is a class token: the one place this is decided.

    From timm's own attributes: a ``cls_token`` parameter that is present and counted among
    ``num_prefix_tokens``. A model with registers but no class token (``class_token=False``)
    has prefix tokens, none of which is a class token.
    """
    return getattr(model, "cls_token", None) is not None and int(getattr(model, "num_prefix_tokens", 1)) > 0


DEFAULT_MAX_GRID = 16  # patches per side shown by default: 224 px for a 14 px patch


@dataclass(frozen=True)
class ModelGeometry:
    """What the UI's controls need to know about a ViT, read from the model itself.

    Attributes:
        depth: number of transformer blocks (``len(model.blocks)``).
        num_heads: attention heads per block (``blocks[i].attn.num_heads``; the most of any
            block, should a model vary them).
        patch: (height, width) of a patch in pixels.
        native_size: (height, width) the weights were trained at (timm's data config).
        default_size: (height, width) offered by default: the native size, or, when that
            grid has more than ``DEFAULT_MAX_GRID`` patches a side (DINOv2's 37 at 518 px),
            the same aspect with ``DEFAULT_MAX_GRID`` patches on the longer side.
        prefix_names: the prefix tokens, in order (`prefix_token_names`).
        class_token: whether the first token is a class token (`has_class_token`).
    """

    depth: int
    num_heads: int
    patch: tuple[int, int]
    native_size: tuple[int, int]
    default_size: tuple[int, int]
    prefix_names: tuple[str, ...]
    class_token: bool

    @property
    def default_grid(self) -> tuple[int, int]:
        return grid_for(self.default_size, self.patch)


def default_size(native: tuple[int, int], patch: tuple[int, int],
                 max_grid: int = DEFAULT_MAX_GRID) -> tuple[int, int]:
    """The size offered by default: ``native``, shrunk to at most ``max_grid`` patches a side.

    Shrinking keeps the aspect ratio (to whole patches, at least one) so a model trained at a
    high resolution still answers quickly on a CPU.
    """
    grid = grid_for(native, patch)
    scale = min(1.0, max_grid / max(*grid, 1))
    return tuple(max(1, round(g * scale)) * p for g, p in zip(grid, patch, strict=True))


def model_geometry(model: torch.nn.Module, data_config: dict) -> ModelGeometry:
    """The geometry of ``model`` as `ModelGeometry`.

    Args:
        model: a timm VisionTransformer (any device, ``meta`` included: no tensor is read).
        data_config: its ``timm.data.resolve_model_data_config(model)``.
    """
    patch = patch_size(model)
    _, height, width = data_config["input_size"]
    native = (int(height), int(width))
    return ModelGeometry(
        depth=len(model.blocks),
        num_heads=max(int(block.attn.num_heads) for block in model.blocks),
        patch=patch,
        native_size=native,
        default_size=default_size(native, patch),
        prefix_names=tuple(prefix_token_names(model)),
        class_token=has_class_token(model),
    )


@functools.lru_cache(maxsize=16)
def architecture_geometry(architecture: str, **model_args) -> ModelGeometry:
    """`model_geometry` of a timm architecture, built on the ``meta`` device: no weights are
    made or read, so a UI can lay out its controls before any model loads.

    Args:
        architecture: a timm model name (its pretrained tag, if any, picks the data config).
        model_args: constructor arguments, as the loader would pass them.
    """
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, **model_args)
    return model_geometry(model, timm.data.resolve_model_data_config(model))


def prefix_token_names(model: torch.nn.Module) -> list[str]:
    """Names of the tokens that precede the patch tokens, in sequence order.

    timm's order is class token, then distillation token (DeiT), then register tokens:
    "CLS", "DIST", "REG1".."REGn"; any other prefix token is "PREFIX<i>".
    """
    names = []
    if has_class_token(model):
        names.append("CLS")
    if getattr(model, "dist_token", None) is not None:
        names.append("DIST")
    names += [f"REG{i + 1}" for i in range(getattr(model, "num_reg_tokens", 0))]
    num_prefix = int(getattr(model, "num_prefix_tokens", len(names)))
    names += [f"PREFIX{i}" for i in range(len(names), num_prefix)]
    return names[:num_prefix]


def principal_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` principal directions of the rows of ``x`` (centred here), largest first.

    From the eigen-decomposition of the smaller Gram matrix in float64, on ``x``'s device.
    On the CPU the decomposition is numpy's: there torch's threaded LAPACK ``eigh``/``svd``
    was several times slower under concurrent requests (BENCHMARKS.md,
    "Serving and first load").

    Args:
        x: (n, d) samples.

    Returns:
        (min(k, n, d), d) orthonormal directions (signs arbitrary, as with any PCA), float32
        on ``x``'s device.
    """
    x = x.detach().double()
    x = x - x.mean(dim=0, keepdim=True)
    n, d = x.shape
    k = min(k, n, d)
    if d <= n:
        _, vecs = _eigh(x.T @ x)  # ascending eigenvalues
        dirs = vecs.flip(-1)[:, :k].T
    else:
        vals, vecs = _eigh(x @ x.T)  # (n, n): right vectors are xᵀu / sqrt(λ)
        u, top = vecs.flip(-1)[:, :k], vals.flip(-1)[:k].clamp_min(1e-30)
        dirs = (x.T @ u / top.sqrt()).T
    return dirs.float().contiguous()


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, on its own device."""
    if gram.device.type == "cpu":
        vals, vecs = np.linalg.eigh(gram.cpu().numpy())
        return torch.from_numpy(vals), torch.from_numpy(np.ascontiguousarray(vecs))
    return torch.linalg.eigh(gram)


def patch_embedding_components(model: torch.nn.Module, k: int = 28) -> torch.Tensor:
    """Principal components of the patch-projection filters (ViT paper, Fig. 7 left).

    The projection maps each flattened (3, ph, pw) patch to D numbers; its D rows span the
    space of patterns the model can "see" in one patch. The top right-singular vectors of the
    centred (D, 3*ph*pw) matrix are those patterns, ordered by how much of it they explain.

    Returns:
        (k, 3, ph, pw) components, each scaled to [0, 1] for display as an RGB tile.
    """
    weight = model.patch_embed.proj.weight.detach().float()  # (D, 3, ph, pw)
    comps = principal_directions(weight.flatten(1), k)  # (k, 3*ph*pw)
    lo = comps.min(dim=1, keepdim=True).values
    hi = comps.max(dim=1, keepdim=True).values
    comps = (comps - lo) / (hi - lo).clamp_min(1e-12)
    return comps.reshape(-1, *weight.shape[1:])


def patch_position_embedding(model: torch.nn.Module, grid: tuple[int, int] | None = None):
    """The position embeddings of the patch tokens, as the model adds them.

    Args:
        grid: (rows, cols) to interpolate to, as timm does for other input sizes (bicubic
            resampling of the native grid); None = the native grid.

    Returns:
        (rows, cols, D) tensor.
    """
    native = tuple(int(g) for g in model.patch_embed.grid_size)
    pos_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    pos = model.pos_embed.detach().float()
    grid = tuple(grid) if grid is not None else native
    if grid != native:
        # The same call timm's VisionTransformer._pos_embed makes with dynamic_img_size.
        pos = resample_abs_pos_embed(pos, new_size=grid, old_size=native, num_prefix_tokens=pos_prefix)
    return pos[0, pos_prefix:].reshape(*grid, -1)


def position_similarity(pos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch's position embedding with every other (Fig. 7 centre).

    Args:
        pos: (rows, cols, D).

    Returns:
        (rows, cols, rows, cols): entry [i, j] is the (rows, cols) similarity map of patch (i, j).
    """
    rows, cols, dim = pos.shape
    unit = F.normalize(pos.reshape(-1, dim), dim=-1)
    return (unit @ unit.T).reshape(rows, cols, rows, cols)


@dataclass(frozen=True)
class AttentionCost:
    """How big self-attention gets for one image, per layer.

    Attributes:
        tokens: sequence length (prefix + patch tokens, or pixels for one-token-per-pixel).
        attention_entries: tokens² scores per head.
        attention_flops: multiply-adds x2 of QKᵀ and of attention @ V over all heads
            (2 * 2 * tokens² * width).
    """

    tokens: int
    attention_entries: int
    attention_flops: int

    @property
    def attention_bytes(self) -> int:
        """Bytes of one head's float32 attention matrix (what materialising it costs)."""
        return 4 * self.attention_entries


def attention_cost(tokens: int, width: int) -> AttentionCost:
    """Self-attention cost of one layer for ``tokens`` tokens of ``width`` channels.

    The one place this is computed: the tokenisation tab prices patches against pixels with
    it, and `explorer.igpt.sequence.attention_cost` prices iGPT's pixel sequence with it.
    """
    return AttentionCost(tokens, tokens * tokens, 4 * tokens * tokens * width)


def compare_costs(
    size: tuple[int, int], patch: tuple[int, int], num_prefix_tokens: int, width: int
) -> dict[str, AttentionCost]:
    """Patch tokens (ViT) against one token per pixel (iGPT-style) for one input size.

    E.g. 224x224 with 16 px patches: 196 patch tokens vs 50,176 pixel tokens.
    """
    rows, cols = grid_for(size, patch)
    return {
        "patches (ViT)": attention_cost(rows * cols + num_prefix_tokens, width),
        "pixels (iGPT-style)": attention_cost(size[0] * size[1], width),
    }


@torch.no_grad()
def last_layer_patch_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Final-norm features of the patch tokens.

    Args:
        pixels: (B, 3, H, W) normalised input.

    Returns:
        (B, rows * cols, D) in raster order (prefix tokens dropped).
    """
    tokens = model.forward_features(pixels)
    return tokens[:, model.num_prefix_tokens :]


def feature_pca_rgb(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """First three principal components of patch features as an RGB image (DINOv2 style).

    Each component is scaled by its own 1st..99th percentile to [0, 1], so a few outlier
    tokens do not wash out the picture.

    Args:
        features: (rows * cols, D) patch features of one image.
        grid: (rows, cols).

    Returns:
        (rows, cols, 3) float tensor in [0, 1].
    """
    x = features.detach().float()
    x = x - x.mean(dim=0, keepdim=True)
    proj = x @ principal_directions(x, 3).T  # (N, 3)
    lo = torch.quantile(proj, 0.01, dim=0, keepdim=True)
    hi = torch.quantile(proj, 0.99, dim=0, keepdim=True)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return rgb.reshape(*grid, 3)


@dataclass
class TokenizationResult:
    """Everything the tokenisation views show for one image at one resolution.

    Attributes:
        pixels: (1, 3, H, W) normalised model input.
        size: (H, W) pixels; grid: (rows, cols); patch: (ph, pw).
        prefix_names: e.g. ["CLS"], ["CLS", "DIST"], ["CLS", "REG1", ...] (`prefix_token_names`).
        filters: (k, 3, ph, pw) patch-projection principal components in [0, 1].
        native_grid: the grid the position embeddings were trained on.
        pos_similarity_native / pos_similarity: (r, c, r, c) at the native / chosen grid;
            None for a model without absolute position embeddings (a relative-position bias
            in its attention instead, `explorer.lab.models.RelPosAttention`).
        costs: patch tokens vs pixel tokens (`compare_costs`).
        feature_rgb: (rows, cols, 3) PCA of the last layer's patch features.
    """

    pixels: torch.Tensor
    size: tuple[int, int]
    grid: tuple[int, int]
    patch: tuple[int, int]
    prefix_names: list[str]
    filters: torch.Tensor
    native_grid: tuple[int, int]
    pos_similarity_native: torch.Tensor | None
    pos_similarity: torch.Tensor | None
    costs: dict[str, AttentionCost]
    feature_rgb: torch.Tensor


# What depends only on the model's embeddings, computed once per model and weights
# (`embedding_views`): the filter PCA was a large share of every /tokens call (BENCHMARKS.md,
# "Serving a lecture hall").
EMBEDDING_VIEWS: KeyedCache[tuple] = KeyedCache(max_items=8)


def embedding_views(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`patch_embedding_components` and the native `position_similarity`, kept per model.

    Keyed by the model object and its embeddings' in-place version counters (an optimiser
    step bumps them), so nothing leaves the model's device to make a key; a weak reference
    checks that an entry belongs to this very model, not to a freed one whose id was reused.
    """
    weight, pos = model.patch_embed.proj.weight, model.pos_embed
    key = (id(model), weight._version, None if pos is None else pos._version)

    def build():
        return (weakref.ref(model), patch_embedding_components(model),
                None if pos is None else position_similarity(patch_position_embedding(model)))

    owner, filters, similarity = EMBEDDING_VIEWS.get_or_build(key, build)
    if owner() is not model:
        EMBEDDING_VIEWS.put(key, entry := build())
        owner, filters, similarity = entry
    return filters, similarity


def analyse_tokenization(model: torch.nn.Module, pixels: torch.Tensor) -> TokenizationResult:
    """Run every tokenisation analysis for one prepared image.

    Args:
        pixels: (1, 3, H, W) normalised input, H and W multiples of the patch size.
    """
    patch = patch_size(model)
    size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
    grid = grid_for(size, patch)
    native_grid = tuple(int(g) for g in model.patch_embed.grid_size)
    pixels = pixels.to(model_device(model))
    features = last_layer_patch_features(model, pixels)[0]
    filters, pos_similarity_native = embedding_views(model)
    return TokenizationResult(
        pixels=pixels,
        size=size,
        grid=grid,
        patch=patch,
        prefix_names=prefix_token_names(model),
        filters=filters,
        native_grid=native_grid,
        pos_similarity_native=pos_similarity_native,
        pos_similarity=None if model.pos_embed is None else
        position_similarity(patch_position_embedding(model, grid)),
        costs=compare_costs(size, patch, model.num_prefix_tokens, model.embed_dim),
        feature_rgb=feature_pca_rgb(features, grid),
    )

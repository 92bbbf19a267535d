"""Colour maps, overlays and tile mosaics shared by every view (numpy/PIL; `as_array` is
where tensors leave their device)."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from explorer.cache import KeyedCache
from explorer.plots import text

COLORMAPS = ["inferno", "viridis", "magma", "jet", "gray"]


def as_array(x) -> np.ndarray:
    """A tensor on any device (or array-like) as a numpy array: the one place views leave
    the model's device. Floating tensors become float32; other dtypes are kept."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return (x.float() if x.is_floating_point() else x).cpu().numpy()
    return np.asarray(x)


def colorize(values: np.ndarray, cmap: str = "inferno", vmin=None, vmax=None) -> np.ndarray:
    """Map a 2-D array to RGB with a matplotlib colour map.

    Args:
        values: (H, W) numbers; NaN becomes black.
        vmin, vmax: colour range; default the array's own min and max.

    Returns:
        (H, W, 3) uint8.
    """
    values = np.asarray(values, dtype=np.float64)
    lo = np.nanmin(values) if vmin is None else vmin
    hi = np.nanmax(values) if vmax is None else vmax
    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    rgb = colormaps[cmap](np.nan_to_num(scaled).clip(0, 1))[..., :3]
    rgb[np.isnan(values)] = 0
    return (rgb * 255 + 0.5).astype(np.uint8)


def upscale(array: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """Resize an (h, w[, 3]) uint8 array to ``size`` = (height, width)."""
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.6, cmap: str = "inferno", smooth=False
) -> np.ndarray:
    """Blend a (rows, cols) heat map over an (H, W, 3) uint8 image.

    Returns:
        (H, W, 3) uint8.
    """
    colored = upscale(colorize(heat, cmap), image.shape[:2], smooth=smooth)
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colored.astype(np.float32)
    return blend.clip(0, 255).astype(np.uint8)


def mosaic(
    tiles: list[np.ndarray],
    cols: int,
    gap: int = 2,
    labels: list[str] | None = None,
    background: int = 255,
    max_lines: int = 2,
) -> np.ndarray:
    """Lay equally sized (h, w, 3) uint8 tiles out in a grid, optional caption under each.

    Captions sit under their tile, never on it, in DejaVu Sans (`explorer.plots.text`), at
    one size for all, word-wrapped to at most ``max_lines`` lines as wide as the tile
    (`caption_layout`).

    Returns:
        (H, W, 3) uint8.
    """
    h, w = tiles[0].shape[:2]
    key = (h, w, len(tiles), cols, gap, tuple(labels or ()), background, max_lines)
    out = _BACKGROUNDS.get_or_build(key, lambda: _labelled_background(*key)).copy()
    rows = -(-len(tiles) // cols)
    label_h = (out.shape[0] - gap) // rows - h - gap  # the caption band the layout chose
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap + label_h), gap + c * (w + gap)
        out[y : y + h, x : x + w] = tile
    return out


# The labelled background depends only on the layout, and drawing its text was most of a big
# mosaic's time (1,369 labels for DINOv2's token sequence at 518 px), so it is drawn once per
# layout.
_BACKGROUNDS: KeyedCache[np.ndarray] = KeyedCache(max_items=32)
CAPTION_PAD = 4  # px above and below a caption's lines


def caption_size(tile_height: int) -> int:
    """The caption font size for tiles ``tile_height`` px tall: 1/7 of it, 10 to 16 px."""
    return max(10, min(16, tile_height // 7))


def caption_layout(labels, tile_width: int, tile_height: int, max_lines: int = 2
                   ) -> tuple[list[text.Caption], int]:
    """Captions of tiles ``tile_width`` px wide laid out to fit it (1 px margin each side),
    and the height of the caption band under each tile row (0 without labels)."""
    if not labels:
        return [], 0
    captions = text.fit_captions(labels, tile_width - 2, caption_size(tile_height),
                                 min_size=8, max_lines=max_lines)
    return captions, max(c.height for c in captions) + 2 * CAPTION_PAD


def _labelled_background(h, w, n, cols, gap, labels, background, max_lines) -> np.ndarray:
    rows = -(-n // cols)
    captions, label_h = caption_layout(labels, w, h, max_lines)
    out = np.full((rows * (h + gap + label_h) + gap, cols * (w + gap) + gap, 3), background, np.uint8)
    if labels:
        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        for i, caption in enumerate(captions):
            r, c = divmod(i, cols)
            y, x = gap + r * (h + gap + label_h) + h + CAPTION_PAD, gap + c * (w + gap)
            for j, line in enumerate(caption.lines):  # anchor "ma": centred, top at ascender
                draw.text((x + w / 2, y + j * text.line_height(caption.font)), line,
                          fill=(0, 0, 0), font=caption.font, anchor="ma")
        out = np.asarray(canvas)
    out.flags.writeable = False  # shared: callers get copies
    return out

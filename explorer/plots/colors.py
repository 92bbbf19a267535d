"""Colour maps, overlays and tile mosaics shared by every view (numpy/PIL; `as_array` is
where tensors leave their device)."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from explorer.cache import KeyedCache

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


def font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled scalable font (no system fonts needed)."""
    return ImageFont.load_default(size=size)


def mosaic(
    tiles: list[np.ndarray],
    cols: int,
    gap: int = 2,
    labels: list[str] | None = None,
    background: int = 255,
) -> np.ndarray:
    """Lay equally sized (h, w, 3) uint8 tiles out in a grid, optional label under each.

    Returns:
        (H, W, 3) uint8.
    """
    h, w = tiles[0].shape[:2]
    label_h = max(12, h // 6) if labels else 0
    key = (h, w, len(tiles), cols, gap, tuple(labels or ()), background)
    out = _BACKGROUNDS.get_or_build(key, lambda: _labelled_background(*key)).copy()
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap + label_h), gap + c * (w + gap)
        out[y : y + h, x : x + w] = tile
    return out


# Labels sit under the tiles, never on them: the labelled background depends only on the
# layout, and drawing its text was most of a big mosaic's time (1,369 labels for DINOv2's
# token sequence at 518 px), so it is drawn once per layout.
_BACKGROUNDS: KeyedCache[np.ndarray] = KeyedCache(max_items=32)


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, size: int, width: float):
    """The font of ``size`` px, smaller until ``text`` fits in ``width`` px (at least 8 px):
    a label never runs into its neighbour's."""
    while size > 8 and draw.textlength(text, font=font(size)) > width:
        size -= 1
    return font(size)


def _labelled_background(h, w, n, cols, gap, labels, background) -> np.ndarray:
    rows = -(-n // cols)
    label_h = max(12, h // 6) if labels else 0
    out = np.full((rows * (h + gap + label_h) + gap, cols * (w + gap) + gap, 3), background, np.uint8)
    if labels:
        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        size = max(9, label_h - 3)
        for i, text in enumerate(labels):
            r, c = divmod(i, cols)
            y, x = gap + r * (h + gap + label_h) + h, gap + c * (w + gap)
            draw.text((x + w / 2, y + label_h / 2), text, fill=(0, 0, 0),
                      font=_fitting_font(draw, text, size, w - 4), anchor="mm")
        out = np.asarray(canvas)
    out.flags.writeable = False  # shared: callers get copies
    return out

"""Views of the patch-tokenisation tab, built from `explorer.patches` results."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image, ImageDraw

from explorer.cache import KeyedCache
from explorer.patches import AttentionCost
from explorer.plots.colors import as_array, colorize, mosaic, upscale
from explorer.plots.text import fit_size, font

PREFIX_COLORS = {"CLS": (220, 60, 60), "DIST": (60, 140, 220), "REG": (90, 170, 90)}


def display_scale(size: tuple[int, int], patch: tuple[int, int], min_cell=28, max_side=1100) -> int:
    """Integer zoom so a patch cell is big enough to carry a label, within ``max_side``."""
    want = max(1, -(-min_cell // min(patch)))
    return max(1, min(want, max_side // max(size)))


def grid_overlay(image: np.ndarray, patch: tuple[int, int], first_index: int = 0) -> np.ndarray:
    """The model-resolution image with the patch grid and each patch's token index.

    Args:
        image: (H, W, 3) uint8 at model resolution (H, W multiples of the patch).
        patch: (ph, pw) pixels.
        first_index: sequence index of the first patch token (= number of prefix tokens).

    Returns:
        (H*s, W*s, 3) uint8, zoomed by `display_scale` so indices stay legible.
    """
    height, width = image.shape[:2]
    scale = display_scale((height, width), patch)
    canvas = Image.fromarray(image).resize((width * scale, height * scale), Image.Resampling.NEAREST)
    key = (height, width, tuple(patch), first_index, scale)
    layer = _GRID_LAYERS.get_or_build(key, lambda: _grid_layer(*key))
    return np.asarray(Image.alpha_composite(canvas.convert("RGBA"), layer).convert("RGB"))


# The grid lines and indices depend only on the geometry: drawn once per geometry on a
# transparent layer, then composited (drawing the text was a large share of a /tokens call
# at high resolution: BENCHMARKS.md, "Serving a lecture hall").
_GRID_LAYERS: KeyedCache[Image.Image] = KeyedCache(max_items=16)


def _grid_layer(height, width, patch, first_index, scale) -> Image.Image:
    layer = Image.new("RGBA", (width * scale, height * scale), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    ph, pw = patch[0] * scale, patch[1] * scale
    rows, cols = height // patch[0], width // patch[1]
    for r in range(rows + 1):
        draw.line([(0, r * ph), (cols * pw, r * ph)], fill=(255, 255, 255, 255), width=1)
    for c in range(cols + 1):
        draw.line([(c * pw, 0), (c * pw, rows * ph)], fill=(255, 255, 255, 255), width=1)
    # one size for every index, the largest that keeps the longest (last) one and its
    # outline inside its patch, clear of the grid lines
    stroke, last = 2, str(first_index + rows * cols - 1)
    text_font = font(fit_size(last, pw - 2 * stroke - 3, ph - 2 * stroke - 3,
                              max(8, int(min(ph, pw) * 0.32))))
    for r in range(rows):
        for c in range(cols):
            x, y = c * pw + pw / 2, r * ph + ph / 2
            draw.text((x, y), str(first_index + r * cols + c), fill=(255, 255, 0, 255),
                      font=text_font, anchor="mm", stroke_width=stroke, stroke_fill=(0, 0, 0, 255))
    return layer


def token_sequence(
    image: np.ndarray, patch: tuple[int, int], prefix_names: list[str], per_row: int | None = None
) -> np.ndarray:
    """The flattened sequence the transformer reads: prefix tokens, then patches in raster order.

    Returns:
        (H', W', 3) uint8: tiles in reading order, wrapped into rows, each labelled with its
        sequence index; prefix tokens are coloured tiles labelled with their names.
    """
    ph, pw = patch
    rows, cols = image.shape[0] // ph, image.shape[1] // pw
    tile = max(ph, pw, 24)
    tiles, labels = [], []
    for i, name in enumerate(prefix_names):
        color = PREFIX_COLORS.get(name.rstrip("0123456789"), (150, 150, 150))
        tiles.append(np.full((tile, tile, 3), color, np.uint8))
        labels.append(f"{i} {name}")  # two lines under a narrow tile: "0" over "CLS"
    for r in range(rows):
        for c in range(cols):
            crop = image[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
            tiles.append(upscale(crop, (tile, tile)))
            labels.append(str(len(prefix_names) + r * cols + c))
    per_row = per_row or min(len(tiles), max(cols, 16))
    return mosaic(tiles, cols=per_row, gap=3, labels=labels)


def filter_tiles(components: torch.Tensor, tile: int = 56, cols: int = 7) -> np.ndarray:
    """Principal components of the patch projection as RGB tiles (Fig. 7 left).

    Args:
        components: (k, 3, ph, pw) in [0, 1].
    """
    arrays = [
        upscale((as_array(c.permute(1, 2, 0)) * 255 + 0.5).astype(np.uint8), (tile, tile))
        for c in components
    ]
    return mosaic(arrays, cols=cols, gap=4, labels=[f"PC{i + 1}" for i in range(len(arrays))])


def similarity_tiles(
    sim: torch.Tensor, width: int = 900, max_tiles: int = 20, cmap: str = "viridis"
) -> np.ndarray:
    """One small map per patch: its position embedding's similarity to all others (Fig. 7 centre).

    Args:
        sim: (rows, cols, rows, cols) cosine similarities.
        width: approximate mosaic width in pixels.
        max_tiles: at most this many tiles per side; bigger grids (DINOv2's 37x37) show every
            k-th patch's map (each map still complete), like the paper's 14x14 figure.

    Returns:
        uint8 RGB mosaic laid out like the patch grid, 1 px white gaps; colours span [-1, 1].
    """
    stride = max(1, -(-max(sim.shape[:2]) // max_tiles))
    sim = sim[::stride, ::stride]
    tile_rows, tile_cols, rows, cols = sim.shape
    zoom = max(1, width // (tile_cols * (cols + 1)))  # pixels per similarity cell
    colored = colorize(as_array(sim), cmap, vmin=-1.0, vmax=1.0)  # (tr, tc, r, c, 3), one call
    tiles = colored.repeat(zoom, axis=2).repeat(zoom, axis=3)  # (tr, tc, r*z, c*z, 3)
    tiles = np.pad(tiles, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)), constant_values=255)
    th, tw = tiles.shape[2:4]
    return np.ascontiguousarray(tiles.transpose(0, 2, 1, 3, 4).reshape(tile_rows * th, tile_cols * tw, 3))


def feature_pca_image(rgb: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(rows, cols, 3) PCA colours in [0, 1] upscaled (nearest) to ``size`` = (height, width)."""
    return upscale((as_array(rgb) * 255 + 0.5).astype(np.uint8), size)


def cost_figure(costs: dict[str, AttentionCost], size: tuple[int, int]) -> go.Figure:
    """Log-scale bars: sequence length and attention-matrix entries, patches vs pixels."""
    names = list(costs)
    fig = go.Figure()
    every = []
    for metric, label in [("tokens", "tokens n"), ("attention_entries", "attention entries n²")]:
        values = [getattr(costs[n], metric) for n in names]
        every += values
        fig.add_bar(name=label, x=names, y=values, text=[f"{v:,}" for v in values],
                    textposition="outside", cliponaxis=False, constraintext="none")
    # log10 units: the shortest bar still shows, and a decade above the tallest holds its
    # number (plotly's range leaves none: the label was cut at the plot's top edge)
    low, high = np.log10(max(1, min(every))) - 0.5, np.log10(max(every)) + 1.0
    fig.update_layout(
        title=f"Self-attention cost for a {size[1]}x{size[0]} image (per layer, per head)",
        yaxis={"type": "log", "range": [low, high]},
        yaxis_title="count (log scale)", barmode="group", height=380,
        margin=dict(l=40, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.15),
    )
    return fig


def cost_table(costs: dict[str, AttentionCost]) -> str:
    """Markdown table of the same numbers, with the ratio that makes the lecture's point."""
    rows = ["| | tokens | attention matrix | attention GFLOPs / layer |", "|---|---:|---:|---:|"]
    for name, cost in costs.items():
        rows.append(f"| {name} | {cost.tokens:,} | {cost.attention_entries:,} | "
                    f"{cost.attention_flops / 1e9:,.2f} |")
    vit, pix = costs["patches (ViT)"], costs["pixels (iGPT-style)"]
    rows.append("")
    rows.append(
        f"One token per pixel makes the sequence **{pix.tokens / vit.tokens:,.0f}x** longer and "
        f"the attention matrix **{pix.attention_entries / vit.attention_entries:,.0f}x** bigger: "
        "attention is O(n²) in the sequence length, and n is O(side²)."
    )
    return "\n".join(rows)

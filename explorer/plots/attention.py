"""Display images and figures for the attention views (numpy / PIL / plotly, no gradio).

Every function takes analysis results (tensors or arrays shaped as in `explorer.attention`)
and the displayed RGB image, and returns an (H, W, 3) uint8 array (saved as PNG by the UI)
or a plotly figure.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw

from explorer.plots.colors import as_array, mosaic, overlay, upscale

TILE = 192  # longer side of one tile in grids (keeps PNGs small and grids readable)


def _tile_image(image: np.ndarray, tile: int = TILE) -> np.ndarray:
    h, w = image.shape[:2]
    scale = tile / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def mark_patch(
    image: np.ndarray, grid: tuple[int, int], cell: tuple[int, int], color=(0, 255, 255)
) -> np.ndarray:
    """Draw a box around grid cell (row, col) on an image of any size."""
    h, w = image.shape[:2]
    rows, cols = grid
    r, c = cell
    y0, y1 = r * h / rows, (r + 1) * h / rows
    x0, x1 = c * w / cols, (c + 1) * w / cols
    canvas = Image.fromarray(image)
    ImageDraw.Draw(canvas).rectangle([x0, y0, x1 - 1, y1 - 1], outline=color,
                                     width=max(1, round(min(h, w) / 120)))
    return np.asarray(canvas)


def heat_overlay(
    image: np.ndarray,
    heat,
    alpha: float = 0.6,
    cmap: str = "inferno",
    cell: tuple[int, int] | None = None,
) -> np.ndarray:
    """One (rows, cols) map over the image at full size; optional box on a query patch."""
    heat = as_array(heat)
    out = overlay(image, heat, alpha=alpha, cmap=cmap)
    return mark_patch(out, heat.shape, cell) if cell is not None else out


def overlay_grid(
    image: np.ndarray,
    heats,
    labels: list[str],
    alpha: float = 0.6,
    cmap: str = "inferno",
    cols: int | None = None,
    cell: tuple[int, int] | None = None,
) -> np.ndarray:
    """Tiles of (k, rows, cols) maps over a small copy of the image, each scaled on its own."""
    heats = as_array(heats)
    small = _tile_image(image)
    tiles = [heat_overlay(small, h, alpha, cmap, cell) for h in heats]
    cols = cols or min(len(tiles), 7)
    return mosaic(tiles, cols=cols, labels=labels)


def head_grid(image, heads, fused, how: str, layer: int, alpha=0.6, cmap="inferno"):
    """Class-token attention of every head of one layer, plus the fused map, as one PNG.

    Args:
        heads: (H, rows, cols); fused: (rows, cols).
    """
    heats = np.concatenate([as_array(heads), as_array(fused)[None]])
    labels = [f"L{layer + 1} head {h + 1}" for h in range(len(heats) - 1)] + [f"L{layer + 1} {how}"]
    return overlay_grid(image, heats, labels, alpha, cmap)


def layer_strip(image, per_layer, alpha=0.6, cmap="inferno", cell=None, title="layer"):
    """All layers at a glance: (L, rows, cols) maps, one tile per layer."""
    per_layer = as_array(per_layer)
    labels = [f"{title} {i + 1}" for i in range(len(per_layer))]
    return overlay_grid(image, per_layer, labels, alpha, cmap, cols=min(len(labels), 12), cell=cell)


def mask_grid(image, masks, keep: float, layer: int) -> np.ndarray:
    """DINO-style masks: per head, the patches holding ``keep`` of the attention mass.

    Args:
        masks: (H, rows, cols) bool.
    """
    masks = as_array(masks).astype(bool)
    small = _tile_image(image)
    tiles = []
    for m in masks:
        big = upscale((m * 255).astype(np.uint8), small.shape[:2]) > 127
        dim = (small.astype(np.float32) * 0.25).astype(np.uint8)
        tiles.append(np.where(big[..., None], small, dim))
    labels = [f"h{h + 1}: {m.mean():.0%}" for h, m in enumerate(masks)]
    return mosaic(tiles, cols=min(len(tiles), 7), labels=labels)


def prefix_share_figure(share, names: list[str]) -> go.Figure:
    """Share of the patches' attention that goes to each prefix token, per layer.

    Args:
        share: (L, P) from `explorer.attention.prefix_attention_share` (one image).
    """
    share = as_array(share)
    layers = np.arange(1, share.shape[0] + 1)
    fig = go.Figure()
    for j, name in enumerate(names):
        fig.add_trace(go.Scatter(x=layers, y=share[:, j], mode="lines+markers", name=name))
    fig.add_trace(go.Scatter(x=layers, y=1 - share.sum(axis=1), mode="lines+markers",
                             name="all patches", line={"dash": "dot", "color": "gray"}))
    fig.update_layout(
        title="Where patch queries look: prefix tokens vs patches",
        xaxis_title="layer", yaxis_title="share of attention (mean over heads, patch queries)",
        yaxis={"range": [0, 1], "tickformat": ".0%"}, height=360, margin={"t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def token_norm_map(image, norms, grid, flagged, cmap="inferno", alpha=0.6) -> np.ndarray:
    """Patch-token norms over the image; high-norm tokens boxed in cyan.

    Args:
        norms: (rows*cols,) patch-token norms; flagged: (rows*cols,) bool.
    """
    rows, cols = grid
    out = overlay(image, as_array(norms).reshape(rows, cols), alpha=alpha, cmap=cmap)
    for i in np.flatnonzero(as_array(flagged)):
        out = mark_patch(out, grid, divmod(int(i), cols))
    return out


def token_norm_figure(norms, names: list[str], threshold, layer: int) -> go.Figure:
    """Histogram of patch-token norms with the high-norm threshold; prefix tokens as lines.

    Args:
        norms: (N,) all token norms of one image after block ``layer``.
        threshold: the high-norm threshold (a float or a 0-dim tensor).
    """
    norms = as_array(norms)
    p = len(names)
    fig = go.Figure(go.Histogram(x=norms[p:], nbinsx=60, name="patch tokens",
                                 marker_color="#4c78a8"))
    # Vertical lines as plain layout shapes: plotly's add_vline was most of this figure's
    # time on every slider move (BENCHMARKS.md, "Serving a lecture hall").
    lines = [(float(threshold), "high-norm threshold", "red", "dash", "left")]
    lines += [(float(norms[j]), name, "#f58518", "solid", "right") for j, name in enumerate(names)]
    shapes = [{"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
               "line": {"color": color, "dash": dash}} for x, _, color, dash, _ in lines]
    notes = [{"x": x, "xref": "x", "y": 1, "yref": "paper", "text": text, "showarrow": False,
              "xanchor": side, "yanchor": "top"} for x, text, _, _, side in lines]
    fig.update_layout(title=f"Token norms after block {layer + 1}", xaxis_title="L2 norm",
                      yaxis_title="patch tokens", height=320, margin={"t": 50, "b": 40},
                      showlegend=False, shapes=shapes, annotations=notes)
    return fig

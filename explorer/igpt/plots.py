"""Pictures of iGPT results (PIL images), built from tokens and palettes; no gradio here."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from explorer.igpt.palette import Palette
from explorer.plots.text import fit_size, font

GAP = 4  # pixels between tiles in a grid
MARK = (220, 40, 40)  # the line that marks where the kept rows end


def tokens_to_image(tokens: torch.Tensor, palette: Palette, scale: int = 1) -> Image.Image:
    """(H, W) tokens -> RGB PIL image, each pixel blown up to scale×scale (nearest)."""
    rgb = palette.dequantize(tokens).cpu().numpy()  # (H, W, 3) uint8
    img = Image.fromarray(rgb, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def completion_grid(real: torch.Tensor, samples: torch.Tensor, palette: Palette, rows_kept: int,
                    scale: int = 4, filled: int | None = None) -> Image.Image:
    """One row per image: the original, then its completions.

    Args:
        real: (n, H, W) tokens of the originals.
        samples: (n, k, H, W) tokens of the completions.
        rows_kept: rows given to the model; a red tick marks the boundary on every tile.
        filled: pixels generated so far in raster order (None = all); the rest is grey.
    Returns:
        RGB image of n rows × (1 + k) tiles.
    """
    n, k, H, W = samples.shape
    th, tw = H * scale, W * scale
    grid = Image.new("RGB", ((1 + k) * (tw + GAP) - GAP, n * (th + GAP) - GAP), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    hidden = torch.zeros(H * W, dtype=torch.bool)
    if filled is not None:
        hidden[filled:] = True
    hidden = hidden.view(H, W).cpu().numpy()
    for i in range(n):
        for j in range(1 + k):
            tile = tokens_to_image(real[i] if j == 0 else samples[i, j - 1], palette)
            if j > 0 and filled is not None:
                arr = np.array(tile)
                arr[hidden] = (128, 128, 128)
                tile = Image.fromarray(arr)
            x, y = j * (tw + GAP), i * (th + GAP)
            grid.paste(tile.resize((tw, th), Image.NEAREST), (x, y))
            yb = y + rows_kept * scale
            draw.line([(x, yb), (x + max(2, scale), yb)], fill=MARK, width=max(1, scale // 2))
            draw.line([(x + tw - max(2, scale), yb), (x + tw, yb)], fill=MARK,
                      width=max(1, scale // 2))
    return grid


def upscale(rgb: np.ndarray, target: int = 280) -> Image.Image:
    """(h, w, 3) uint8 -> PIL image blown up (nearest) so its longer side is about `target`."""
    img = Image.fromarray(rgb, "RGB")
    s = max(1, target // max(img.size))
    return img.resize((img.width * s, img.height * s), Image.NEAREST)


def palette_swatch(palette: Palette, cell: int | None = None, per_row: int = 32) -> Image.Image:
    """All colours of the palette as a grid of cells, token 0 top-left, in token order.

    Small palettes get big cells with their token number written in."""
    colors = palette.colors.cpu().numpy()  # (K, 3)
    K = len(colors)
    cell = cell or (36 if K <= 32 else 14)
    per_row = min(per_row, K)
    rows = -(-K // per_row)
    img = Image.new("RGB", (per_row * cell, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, c in enumerate(colors):
        x, y = (k % per_row) * cell, (k // per_row) * cell
        draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=tuple(int(v) for v in c))
        if cell >= 24:
            ink = (0, 0, 0) if c.mean() > 127 else (255, 255, 255)
            draw.text((x + 4, y + 3), str(k), fill=ink, font=font(fit_size(str(k), cell - 8,
                                                                             cell - 8, 14)))
    return img


def sequence_ribbon(tokens: torch.Tensor, palette: Palette, per_line: int | None = None,
                    cell: int = 10, max_tokens: int = 1024) -> Image.Image:
    """The raster-order sequence as a ribbon of cells, start token first (red, marked S).

    tokens: (H, W). Lines hold `per_line` tokens (default 2W, so two image rows share a line
    and the picture visibly turns into a sequence). At most `max_tokens` pixel tokens drawn.
    """
    H, W = tokens.shape
    per_line = per_line or 2 * W
    seq = tokens.flatten()[:max_tokens]
    colors = palette.dequantize(seq).cpu().numpy()
    n = len(seq) + 1  # + start token
    lines = -(-n // per_line)
    img = Image.new("RGB", (per_line * cell, lines * (cell + 3)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i in range(n):
        x, y = (i % per_line) * cell, (i // per_line) * (cell + 3)
        if i == 0:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=MARK)
            draw.text((x + cell / 2, y + cell / 2), "S", fill=(255, 255, 255), anchor="mm",
                      font=font(fit_size("S", cell - 2, cell - 2, cell)))
        else:
            c = tuple(int(v) for v in colors[i - 1])
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=c, outline=(200, 200, 200))
    return img


def bits_heatmap(bits: torch.Tensor, title: str = ""):
    """(H, W) bits -> plotly heatmap (row 0 at the top), hover shows each pixel's bits."""
    import plotly.graph_objects as go

    H, W = bits.shape
    fig = go.Figure(go.Heatmap(z=bits.cpu().numpy(), colorscale="Inferno", zmin=0,
                               colorbar={"title": "bits"},
                               hovertemplate="row %{y}, col %{x}: %{z:.2f} bits<extra></extra>"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_xaxes(constrain="domain")
    fig.update_layout(title=title, height=360, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def cost_table(costs: list[dict], n_layer: int, n_head: int) -> str:
    """Markdown: sequence length and attention-matrix size per image size (quadratic cost).

    costs: `sequence.attention_cost(...)` dicts, the first one the model's own size.
    """
    base = costs[0]["attn_entries"]
    lines = ["| image | pixels = tokens | sequence (with start) | attention matrix (1 head) "
             f"| fp32, one head | all {n_layer}×{n_head} heads | × this model's size |",
             "|---|---|---|---|---|---|---|"]
    for c in costs:
        all_mb = c["attn_mb"] * n_layer * n_head
        lines.append(f"| {c['size']} | {c['pixels']:,} | {c['seq_len']:,} | "
                     f"{c['seq_len']:,}² = {c['attn_entries']:,} | {_mb(c['attn_mb'])} | "
                     f"{_mb(all_mb)} | {c['attn_entries'] / base:,.0f}× |")
    return "\n".join(lines)


def _mb(mb: float) -> str:
    return f"{mb / 1e3:,.1f} GB" if mb >= 1e3 else f"{mb:,.1f} MB"

"""The ViT paper's Fig. 7 (right) for this image, several models, a dataset band and a CNN."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch

from explorer.plots.colors import as_array, colorize, mosaic, upscale

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def distance_figure(
    series: list[tuple[str, torch.Tensor]],
    band: tuple[str, torch.Tensor, torch.Tensor] | None = None,
    cnn=None,
    uniform: float | None = None,
    title: str = "Mean attention distance per head",
) -> go.Figure:
    """x = layer, y = mean attention distance in pixels, one dot per head and model.

    Args:
        series: (model label, (L, H) distances) for each model on this image.
        band: (label, mean (L, H), std (L, H)) from a dataset: shaded from the lowest
            head's mean - std to the highest head's mean + std in each layer.
        cnn: `explorer.distance.CNNReceptiveFields`, drawn at relative depth (its last
            stage at the last ViT layer) with its theoretical and effective distances.
        uniform: distance of uniform attention over the whole grid (the "global" ceiling).
    """
    fig = go.Figure()
    depth = max((int(d.shape[0]) for _, d in series), default=1)
    if band is not None:
        label, mean, std = band
        mean, std = as_array(mean), as_array(std)
        layers = np.arange(1, mean.shape[0] + 1)
        low, high = (mean - std).min(axis=1), (mean + std).max(axis=1)
        fig.add_trace(go.Scatter(x=np.r_[layers, layers[::-1]], y=np.r_[high, low[::-1]],
                                 fill="toself", fillcolor="rgba(120,120,120,0.18)",
                                 line={"width": 0}, name=label, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=layers, y=mean.mean(axis=1), mode="lines",
                                 line={"color": "rgba(90,90,90,0.8)", "dash": "dot"},
                                 name=f"{label}: mean over heads"))
    for i, (label, dist) in enumerate(series):
        d = as_array(dist)
        L, H = d.shape
        rng = np.random.default_rng(i)  # small, fixed jitter so heads do not overlap
        x = np.repeat(np.arange(1, L + 1), H) + rng.uniform(-0.18, 0.18, L * H) + 0.08 * i
        heads = np.tile(np.arange(1, H + 1), L)
        fig.add_trace(go.Scatter(
            x=x, y=d.reshape(-1), mode="markers", name=label,
            marker={"size": 7, "color": PALETTE[i % len(PALETTE)], "opacity": 0.85},
            customdata=np.stack([np.repeat(np.arange(1, L + 1), H), heads], axis=1),
            hovertemplate="layer %{customdata[0]}, head %{customdata[1]}: %{y:.1f} px"
                          "<extra>" + label + "</extra>",
        ))
    if cnn is not None:
        stages = len(cnn.stages)
        x = np.arange(1, stages + 1) / stages * depth
        names = [f"{s} (field {t} px)" for s, t in zip(cnn.stages, cnn.theoretical_uncapped,
                                                        strict=True)]
        fig.add_trace(go.Scatter(x=x, y=cnn.theoretical_distance, mode="lines+markers",
                                 name="MobileNetV2: theoretical field (uniform weights)",
                                 line={"color": "#17becf", "dash": "dash"}, text=names,
                                 hovertemplate="%{text}: %{y:.1f} px<extra></extra>"))
        fig.add_trace(go.Scatter(x=x, y=cnn.effective_distance, mode="lines+markers",
                                 name="MobileNetV2: effective field (gradients)",
                                 line={"color": "#17becf"}, text=names,
                                 hovertemplate="%{text}: %{y:.1f} px<extra></extra>"))
    if uniform is not None:
        fig.add_hline(y=uniform, line_dash="dot", line_color="black",
                      annotation_text="uniform attention over the image",
                      annotation_position="bottom right")
    fig.update_layout(
        title=title, xaxis_title="network depth (ViT layer; CNN stages at the same relative depth)",
        yaxis_title="mean attention distance (pixels)", height=480,
        xaxis={"dtick": 1, "range": [0.5, depth + 0.6]}, yaxis={"rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.2}, margin={"t": 50, "b": 40},
    )
    return fig


def spread_stages(num_stages: int, count: int = 7) -> list[int]:
    """``count`` stage indices spread evenly from the first to the last (fewer if it has fewer)."""
    if num_stages <= 0:
        return []
    return sorted({round(i * (num_stages - 1) / max(count - 1, 1)) for i in range(count)})


def erf_mosaic(cnn, stages: list[int] | None = None, cmap: str = "inferno", tile: int = 160) -> np.ndarray:
    """Effective receptive field maps (normalised |gradient|) of some CNN stages, as one PNG.

    Args:
        cnn: `explorer.distance.CNNReceptiveFields`.
        stages: indices into its stages; default `spread_stages` over all of them.
    """
    maps = as_array(cnn.erf_maps)
    stages = stages if stages is not None else spread_stages(len(maps))
    tiles = [upscale(colorize(np.sqrt(maps[s]), cmap, 0, 1), (tile, tile), smooth=True)
             for s in stages]  # sqrt: the tails stay visible
    labels = [f"{cnn.stages[s]}: {cnn.effective_distance[s]:.0f} px" for s in stages]
    return mosaic(tiles, cols=len(tiles), labels=labels)

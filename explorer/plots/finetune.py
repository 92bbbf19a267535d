"""Figures of the fine-tuning tab, built from `explorer.finetune` results and `ImageSet`s."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from explorer.datasets import ImageSet
from explorer.finetune.probe import LayerwiseProbe
from explorer.plots.colors import mosaic, upscale
from explorer.plots.tokens import similarity_tiles

TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#d62728"


def split_counts_figure(train: dict[str, int], val: dict[str, int]) -> go.Figure:
    """Stacked bars: training and validation images per class after the split."""
    fig = go.Figure([
        go.Bar(name="train", x=list(train), y=list(train.values()), marker_color=TRAIN_COLOR),
        go.Bar(name="validation", x=list(val), y=list(val.values()), marker_color=VAL_COLOR),
    ])
    fig.update_layout(barmode="stack", title="Images per class (train + validation)",
                      xaxis_title="class", yaxis_title="images", height=320,
                      margin=dict(l=50, r=20, t=50, b=50))
    return fig


def training_curves(history: list[dict], title: str = "Training") -> go.Figure:
    """Loss (left) and accuracy (right) against optimiser step, train and validation.

    Args:
        history: `FinetuneResult.history` entries; train steps carry ``loss``/``acc``,
            evaluations ``val_loss``/``val_acc``.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_acc" in h]
    for col, key in ((1, "loss"), (2, "acc")):
        fig.add_trace(go.Scatter(x=[h["step"] for h in train], y=[h[key] for h in train],
                                 mode="lines", name="train", line_color=TRAIN_COLOR,
                                 showlegend=col == 1, legendgroup="train"), 1, col)
        fig.add_trace(go.Scatter(x=[h["step"] for h in val], y=[h[f"val_{key}"] for h in val],
                                 mode="lines+markers", name="validation", line_color=VAL_COLOR,
                                 showlegend=col == 1, legendgroup="val"), 1, col)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title_text="optimiser step")
    fig.update_layout(title=title, height=340, margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def confusion_figure(confusion: np.ndarray, classes: list[str]) -> go.Figure:
    """Heatmap of the confusion matrix: colour = share of the true class, text = count."""
    confusion = np.asarray(confusion)
    share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig = go.Figure(go.Heatmap(z=share, x=classes, y=classes, text=confusion,
                               texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
                               colorbar=dict(title="share")))
    acc = np.trace(confusion) / max(confusion.sum(), 1)
    fig.update_layout(title=f"Confusion matrix (validation accuracy {acc:.1%})",
                      xaxis_title="predicted", yaxis_title="true", height=460,
                      yaxis=dict(autorange="reversed"), margin=dict(l=90, r=20, t=50, b=90))
    return fig


def misclassified_indices(labels: np.ndarray, preds: np.ndarray, max_items: int = 16
                          ) -> np.ndarray:
    """Indices of wrong predictions, spread over true classes (round robin), at most max_items."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(preds))
    by_class = [list(wrong[labels[wrong] == c]) for c in np.unique(labels[wrong])]
    picked = []
    while by_class and len(picked) < max_items:
        for queue in by_class:
            if queue and len(picked) < max_items:
                picked.append(queue.pop(0))
        by_class = [q for q in by_class if q]
    return np.asarray(picked, dtype=np.int64)


def misclassified_grid(val_set: ImageSet, labels: np.ndarray, preds: np.ndarray,
                       max_items: int = 16, tile: int = 96, cols: int = 8) -> np.ndarray | None:
    """Mosaic of misclassified validation images labelled "true → predicted".

    Returns:
        (H, W, 3) uint8, or None when nothing was misclassified.
    """
    picked = misclassified_indices(labels, preds, max_items)
    if len(picked) == 0:
        return None
    tiles = [upscale(np.asarray(val_set.image(int(i)).resize((tile, tile))), (tile, tile))
             for i in picked]
    names = val_set.classes
    captions = [f"{names[labels[i]]} → {names[preds[i]]}" for i in picked]
    # up to three lines under a tile: "T-shirt/top →" / "Ankle boot" fit without cutting
    return mosaic(tiles, cols=min(cols, len(tiles)), gap=3, labels=captions, max_lines=3)


def probe_depth_figure(probes: list[LayerwiseProbe], relative: bool | None = None) -> go.Figure:
    """Linear-probe accuracy after each block, one line per model (as in iGPT's Figure 3).

    Args:
        probes: one `LayerwiseProbe` per model.
        relative: x = depth / number of blocks (compare models of different depth);
            default: only when the models' depths differ.
    """
    if relative is None:
        relative = len({len(p.depths) for p in probes}) > 1
    fig = go.Figure()
    for probe in probes:
        x = [d / len(probe.depths) for d in probe.depths] if relative else probe.depths
        fig.add_trace(go.Scatter(x=x, y=probe.val_acc, mode="lines+markers",
                                 name=f"{probe.model_name} (validation)"))
        fig.add_trace(go.Scatter(x=x, y=probe.train_acc, mode="lines", line_dash="dot",
                                 name=f"{probe.model_name} (train)", opacity=0.6))
    fig.update_layout(title="Linear probe accuracy vs depth",
                      xaxis_title="relative depth" if relative else "block",
                      yaxis_title="accuracy", height=360, margin=dict(l=50, r=20, t=50, b=40))
    return fig


def position_similarity_image(sim: torch.Tensor) -> np.ndarray:
    """The interpolated position embeddings' similarity maps, one tile per patch (uint8 RGB)."""
    return similarity_tiles(sim)

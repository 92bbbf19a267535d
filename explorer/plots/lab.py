"""Figures of the inductive-bias & scale lab, built from the grid's rows through
`explorer.lab.analysis` (the lab tab and the Lecture draw the same ones)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from explorer.lab.analysis import (
    LAST_SHARE,
    ComputeCurve,
    ErrorPoint,
    best_per_budget,
    compute_curves,
    error_vs_data,
    late_line,
)
from explorer.lab.models import ARCH_LABELS
from explorer.plots.axes import label_log_axis, label_sizes

ARCH_COLOURS = {"cnn": "#1f77b4", "vit": "#d62728", "vit_rel": "#ff7f0e", "coatnet": "#2ca02c"}
WIDTH_COLOURS = ("#c6dbef", "#6baed6", "#2171b5", "#08306b", "#000000")


def _band(colour: str) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},0.18)"


def _say(fig: go.Figure, text: str) -> None:
    """Write ``text`` across the middle of ``fig`` (what is missing, and why)."""
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 16, "color": "#666"})


def data_figure(rows: list[dict], live: dict | None = None) -> go.Figure:
    """The grid's test error against training images (`error_vs_data_figure`)."""
    return error_vs_data_figure(error_vs_data(rows), live)


def still_training_figure(title: str, what: str) -> go.Figure:
    """An empty figure that says what is missing because the grid has not trained it yet."""
    fig = go.Figure()
    _say(fig, f"{what} is still training")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=420)
    return fig


def scrambled_figure(rows: list[dict]) -> go.Figure:
    """The wrong-bias experiment: test error on scrambled images against training images,
    each architecture's original-data curve dotted beside it for reference."""
    fig = error_vs_data_figure(error_vs_data(rows, "scrambled"))
    for arch, points in error_vs_data(rows).items():
        fig.add_trace(go.Scatter(
            x=[p.train_images for p in points], y=[100 * p.mean for p in points],
            mode="lines", name=f"{ARCH_LABELS.get(arch, arch)}, original images",
            legendgroup=arch, showlegend=False, hoverinfo="skip", opacity=0.6,
            line={"color": ARCH_COLOURS.get(arch, "#7f7f7f"), "width": 1.5, "dash": "dot"}))
    fig.update_layout(title="Scrambled Fashion-MNIST: test error vs training images<br>"
                            "<sup>dotted: the same model on the original images</sup>")
    label_sizes(fig)
    return fig


def scaling_figure(rows: list[dict], attempts: Sequence[dict] = ()) -> go.Figure:
    """The grid's ViT size sweep against training compute, with the CNN's runs at the same
    data sizes for reference (`compute_figure`); a figure saying it is still training when
    the grid has no sweep run yet. ``attempts``: the runs the rule trained again, each a
    complete run at its own budget, so a point of the frontier too."""
    curves = compute_curves(rows, attempts)
    if not curves:
        return still_training_figure("Scaling: ViT sizes against training compute",
                                     "The ViT size sweep")
    return compute_figure(curves, compute_curves(rows, attempts, "cnn",
                                                 {c.train_images for c in curves}))


def error_vs_data_figure(curves: dict[str, list[ErrorPoint]],
                         live: dict | None = None) -> go.Figure:
    """Test error against training images (log axis), one line per architecture, the shaded
    band spanning the seeds; ``live`` (arch, train_images, error) adds the visitor's run."""
    fig = go.Figure()
    for arch, points in curves.items():
        colour = ARCH_COLOURS.get(arch, "#7f7f7f")
        xs = [p.train_images for p in points]
        fig.add_trace(go.Scatter(
            x=xs + xs[::-1], y=[100 * p.high for p in points] + [100 * p.low for p in points][::-1],
            # lines only: plotly's default mode would mark every corner of the band
            mode="lines", fill="toself", fillcolor=_band(colour), line={"width": 0},
            hoverinfo="skip",
            showlegend=False, legendgroup=arch))
        fig.add_trace(go.Scatter(
            x=xs, y=[100 * p.mean for p in points], mode="lines+markers",
            name=ARCH_LABELS.get(arch, arch), legendgroup=arch,
            line={"color": colour, "width": 3}, marker={"size": 8},
            customdata=[[p.seeds, 100 * p.low, 100 * p.high] for p in points],
            hovertemplate="%{x} images: %{y:.1f}% error (%{customdata[0]} seeds, "
                          "%{customdata[1]:.1f}–%{customdata[2]:.1f})<extra>%{fullData.name}</extra>"))
    if live is not None:
        fig.add_trace(go.Scatter(
            x=[live["train_images"]], y=[100 * live["error"]], mode="markers",
            name=f"your run: {ARCH_LABELS.get(live['arch'], live['arch'])}"
                 + (f", {live['steps']:,} steps" if "steps" in live else ""),
            marker={"symbol": "star", "size": 20, "color": ARCH_COLOURS.get(live["arch"]),
                    "line": {"color": "black", "width": 2}}))
    if not curves:
        _say(fig, "no finished runs yet: the grid is still training")
    fig.update_layout(
        title="Fashion-MNIST from scratch, trained here: test error vs training images",
        xaxis={"title": "training images (log scale)", "type": "log"},
        yaxis={"title": "test error (%)", "rangemode": "tozero"}, height=460,
        showlegend=True,  # also for a lone live run (plotly hides a one-trace legend)
        legend={"orientation": "h", "y": -0.2}, margin={"t": 60})
    label_sizes(fig)
    return fig


def compute_figure(curves: list[ComputeCurve],
                   reference: list[ComputeCurve] = ()) -> go.Figure:
    """The size sweep: test error against training compute, one line per ViT width, one panel
    per data size; the dashed line is the best any size reached within each budget.
    ``reference`` (the CNN's runs at the same data sizes) is drawn in grey."""
    sizes = sorted({c.train_images for c in curves})
    widths = sorted({c.width for c in curves})
    fig = make_subplots(rows=1, cols=len(sizes), shared_yaxes=True,
                        subplot_titles=[f"{n:,} images" for n in sizes])
    for col, n in enumerate(sizes, start=1):
        group = [c for c in curves if c.train_images == n]
        for c in group:
            colour = WIDTH_COLOURS[min(widths.index(c.width), len(WIDTH_COLOURS) - 1)]
            fig.add_trace(go.Scatter(
                x=c.compute, y=[100 * e for e in c.error], mode="lines+markers",
                # short names (the legend's title says what they are): two fit a line
                name=f"w{c.width} ({c.params / 1e3:.0f}k)",
                legendgroup=str(c.width), showlegend=col == 1,
                line={"color": colour, "width": 2.5}), row=1, col=col)
        lo = min(min(c.compute) for c in group)
        hi = max(max(c.compute) for c in group)
        budgets = np.geomspace(lo, hi, 40)
        best = best_per_budget(group, budgets)
        frontier = [min((e for c in group for x, e in zip(c.compute, c.error, strict=False) if x <= b),
                        default=np.nan) for b in budgets]
        fig.add_trace(go.Scatter(
            x=budgets, y=[100 * f for f in frontier], mode="lines", name="best per budget",
            legendgroup="frontier", showlegend=col == 1, customdata=best,
            hovertemplate="budget %{x:.2e} FLOPs: best width %{customdata}<extra></extra>",
            line={"color": "#444", "dash": "dash", "width": 1.5}), row=1, col=col)
        for c in (r for r in reference if r.train_images == n):
            fig.add_trace(go.Scatter(
                x=c.compute, y=[100 * e for e in c.error], mode="lines+markers",
                name=f"CNN ({c.params / 1e3:.0f}k)", legendgroup="cnn",
                showlegend=col == 1, line={"color": "#999", "width": 2, "dash": "dot"}),
                row=1, col=col)
        fig.update_xaxes(type="log", title_text="training FLOPs", row=1, col=col)
        drawn = [x for t in fig.select_traces(row=1, col=col) for x in t.x]
        label_log_axis(fig, min(drawn), max(drawn), row=1, col=col)
    fig.update_yaxes(title_text="test error (%)", row=1, col=1)
    fig.update_layout(title="Scaling: ViT sizes against training compute (trained here)",
                      height=460, margin={"t": 70},
                      # in plotly's default "grouped" order a horizontal legend gives each
                      # group a line: six lines squeezed the plot to a strip on a projector
                      legend={"orientation": "h", "y": -0.25, "traceorder": "normal",
                              "title": {"text": "ViT width (parameters); grey: the CNN",
                                        "side": "top"}})
    return fig


def relative_bias_figure(tables: torch.Tensor) -> go.Figure:
    """Every head's learned w_{i−j} as a (2H−1)×(2W−1) image: rows are blocks, columns heads
    (named once, above the columns and left of the rows: a title on each of the 16 small
    images ran into its neighbours at a projector's fonts); the centre is a patch attending
    to itself, up/left are keys above/left of the query."""
    L, H, h, w = tables.shape
    fig = make_subplots(rows=L, cols=H, horizontal_spacing=0.02, vertical_spacing=0.04,
                        column_titles=[f"head {j + 1}" for j in range(H)])
    for i in range(L):
        for j in range(H):
            t = tables[i, j].cpu().numpy()
            fig.add_trace(go.Heatmap(
                z=t, x=np.arange(w) - w // 2, y=np.arange(h) - h // 2, coloraxis="coloraxis",
                hovertemplate=f"block {i + 1} head {j + 1}<br>offset (dy %{{y}}, dx %{{x}}): "
                              "w = %{z:.2f}<extra></extra>"),
                row=i + 1, col=j + 1)
        fig.update_yaxes(title_text=f"block {i + 1}", row=i + 1, col=1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed", scaleanchor=None)
    fig.update_layout(title="Learned relative-position bias w(i−j) per head "
                            "(centre: the query patch itself)",
                      coloraxis={"colorscale": "RdBu_r", "cmid": 0}, height=160 * L + 80,
                      margin={"t": 80})
    return fig


def shift_figure(table: dict[str, dict[str, list[float]]], shift_px: int) -> go.Figure:
    """The translation test: per layer, the features' relative error (every model, top) and
    the attention maps' distance (ViTs, below) between the shifted input and the shifted
    original. One above the other, on one layer axis: side by side, at a projector's fonts
    in half a tab's width, their titles ran into each other."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.14,
                        subplot_titles=("features: ‖F(Sx) − S F(x)‖ / ‖F(x)‖",
                                        "attention maps: total-variation distance"))
    for name, entry in table.items():
        colour = ARCH_COLOURS.get(name, "#7f7f7f")
        label = ARCH_LABELS.get(name, name)
        feats = entry["features"]
        fig.add_trace(go.Scatter(x=list(range(1, len(feats) + 1)), y=feats, name=label,
                                 legendgroup=name, mode="lines+markers",
                                 line={"color": colour, "width": 3}), row=1, col=1)
        if "attention" in entry:
            att = entry["attention"]
            fig.add_trace(go.Scatter(x=list(range(1, len(att) + 1)), y=att, name=label,
                                     legendgroup=name, showlegend=False, mode="lines+markers",
                                     line={"color": colour, "width": 3}), row=2, col=1)
    fig.update_xaxes(dtick=1)
    fig.update_xaxes(title_text="layer (conv layer or transformer block)", row=2, col=1)
    fig.update_yaxes(title_text="0 = exact", rangemode="tozero")
    fig.update_layout(title=f"Translation test: input shifted {shift_px} px down and right "
                            "(borders excluded)", height=520,
                      legend={"orientation": "h", "y": -0.2}, margin={"t": 70})
    return fig


def live_figure(history: list[tuple[int, float, float | None]], title: str) -> go.Figure:
    """A live run's training loss and validation accuracy against the step."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    steps = [h[0] for h in history]
    fig.add_trace(go.Scatter(x=steps, y=[h[1] for h in history], name="training loss",
                             line={"color": "#1f77b4"}), secondary_y=False)
    acc = [(s, a) for s, _, a in history if a is not None]
    if acc:
        fig.add_trace(go.Scatter(x=[s for s, _ in acc], y=[100 * a for _, a in acc],
                                 name="validation accuracy", mode="lines+markers",
                                 line={"color": "#d62728"}), secondary_y=True)
    fig.update_yaxes(title_text="loss", secondary_y=False, rangemode="tozero")
    fig.update_yaxes(title_text="validation accuracy (%)", secondary_y=True, range=[0, 100])
    fig.update_layout(title=title, xaxis_title="optimisation step", height=380,
                      margin={"t": 60}, legend={"orientation": "h", "y": -0.25})
    return fig


def run_curve_figure(row: dict, title: str) -> go.Figure:
    """One run's validation and training accuracy against the step, its last fifth shaded
    and the line the convergence rule fits there (`analysis.late_line`) drawn over it."""
    steps = [p[0] for p in row["curve"]]
    fig = go.Figure()
    fig.add_vrect(x0=(1 - LAST_SHARE) * row["steps"], x1=row["steps"], line_width=0,
                  fillcolor="rgba(120,120,120,0.12)",
                  annotation_text=f"last {100 * LAST_SHARE:.0f}%", annotation_position="top left")
    fig.add_trace(go.Scatter(x=steps, y=[100 * p[2] for p in row["curve"]], name="train",
                             mode="lines+markers", line={"color": "#1f77b4"}))
    fig.add_trace(go.Scatter(x=steps, y=[100 * p[1] for p in row["curve"]], name="validation",
                             mode="lines+markers", line={"color": "#d62728"}))
    (x0, y0), (x1, y1) = late_line(row["curve"], row["steps"])
    fig.add_trace(go.Scatter(x=[x0, x1], y=[100 * y0, 100 * y1], mode="lines",
                             name="fitted: validation's late gain",
                             line={"color": "#000", "dash": "dash", "width": 3}))
    fig.update_layout(title=title, xaxis_title="optimisation step", yaxis_title="accuracy (%)",
                      height=420, margin={"t": 80}, legend={"orientation": "h", "y": -0.2})
    return fig

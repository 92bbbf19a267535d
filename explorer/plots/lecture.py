"""Figures of the lecture's own numbers (quoted from the papers, never measured here),
and the projector style shared by every lecture figure."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from explorer.lecture import PAPER_IMAGENET, PAPER_SOURCE
from explorer.plots.axes import label_log_axis

PRESENTER_FONT = 22  # px: legible from the back of a room on a 1280x720 projector
TITLE_LINE = 44  # characters of a title that fit one line of a presenter figure at that font
PAPER_COLOURS = {"ViT": "#d62728", "CNN": "#1f77b4"}
# two lines: plotly never wraps a title, and on one line the source ran off a half-width figure
PAPER_TITLE = f"Paper numbers, not measured here<br><sup>{PAPER_SOURCE}</sup>"


def _family(model: str) -> str:
    return "ViT" if model.startswith("ViT") else "CNN"


def paper_data_figure() -> go.Figure:
    """ImageNet top-1 of ViT-L/16 pre-trained on ImageNet-21k vs JFT-300M, and the best CNN
    of the lecture's table: more pre-training data lifts the ViT past the CNN."""
    rows = [r for r in PAPER_IMAGENET if r[0] in ("ViT-L/16", "BiT-L (ResNet152x4)")]
    labels = [f"{m}<br>pre-trained on {d}" for m, d, _, _ in rows]
    fig = go.Figure(go.Bar(
        x=labels, y=[acc for _, _, acc, _ in rows], text=[f"{acc:.2f}%" for *_, acc, _ in rows],
        textposition="outside", marker_color=[PAPER_COLOURS[_family(m)] for m, *_ in rows]))
    fig.update_layout(title=PAPER_TITLE,
                      yaxis={"title": "ImageNet top-1 (%)", "range": [80, 90]}, height=460,
                      margin={"t": 60})
    return fig


# Where each point's label sits. The five points crowd the top right, so the labels are two
# short lines placed by hand, checked in Chromium at the tab's width and at a projector's
# fonts (tests/browser/test_presenter.py measures that no two labels or markers overlap): the
# ends' labels grow inwards (plotly clips text leaving the plot)
PAPER_LABEL_SIDES = {
    ("ViT-H/14", "JFT-300M"): "top left",
    ("ViT-L/16", "JFT-300M"): "middle right",
    ("ViT-L/16", "ImageNet-21k"): "middle right",
    ("BiT-L (ResNet152x4)", "JFT-300M"): "bottom left",
    ("Noisy Student (EfficientNet-L2)", "JFT-300M"): "top left",
}


def paper_scaling_figure() -> go.Figure:
    """ImageNet top-1 against pre-training compute (TPUv3-core-days, log axis)."""
    fig = go.Figure()
    logs = [math.log10(days) for *_, days in PAPER_IMAGENET]
    pad = 0.1 * (max(logs) - min(logs))
    low, high = min(logs) - pad, max(logs) + pad
    for family in PAPER_COLOURS:
        rows = [r for r in PAPER_IMAGENET if _family(r[0]) == family]
        fig.add_trace(go.Scatter(
            x=[days for *_, days in rows], y=[acc for _, _, acc, _ in rows],
            # short labels on the plot (the full model name on hover): long ones collide
            mode="markers+text", name=family,
            text=[f"{m.split(' (')[0]}<br>{d}" for m, d, _, _ in rows],
            hovertext=[f"{m}, pre-trained on {d}: {acc}% top-1, {days:,} TPUv3-core-days"
                       for m, d, acc, days in rows], hoverinfo="text",
            textposition=[PAPER_LABEL_SIDES[m, d] for m, d, *_ in rows],
            marker={"size": 14, "color": PAPER_COLOURS[family]}))
    fig.update_layout(title=PAPER_TITLE,
                      xaxis={"title": "pre-training compute (TPUv3-core-days)", "type": "log",
                             "range": [low, high]},
                      yaxis={"title": "ImageNet top-1 (%)", "range": [84.5, 89.5]}, height=460,
                      # inside, in the empty top-left corner: beside the plot it took a
                      # fifth of a half-width figure's width
                      legend={"x": 0.02, "y": 0.98, "xanchor": "left", "yanchor": "top",
                              "bgcolor": "rgba(255,255,255,0.7)"},
                      margin={"t": 60})
    label_log_axis(fig, 10 ** low, 10 ** high)
    return fig


def for_projector(fig: go.Figure, presenter: bool, fill: bool = False) -> go.Figure:
    """Large fonts (every label ≥ 18 px) when presenting; the figure is changed in place.

    Args:
        fill: when presenting, leave the height to the page (plotly then fills the box the
            page gives the figure: the Lecture's, the rest of the screen) instead of 600 px
            with room above the title for the figure's label (a half-width figure of a tab).
    """
    if presenter:
        fig.update_layout(font={"size": PRESENTER_FONT}, title_font={"size": PRESENTER_FONT + 2},
                          legend_font={"size": PRESENTER_FONT - 2}, height=None if fill else 600)
        if not fill:  # the block's label sits over the figure's top-left corner
            fig.update_layout(margin={"t": max(fig.layout.margin.t or 0, 120)})
        fig.update_annotations(font_size=PRESENTER_FONT - 2)
        fig.update_traces(textfont_size=PRESENTER_FONT - 2, selector={"mode": "markers+text"})
        fig.update_traces(textfont_size=PRESENTER_FONT - 2, selector={"type": "bar"})
        title = fig.layout.title.text
        head, sep, rest = (title or "").partition("<br>")  # a subtitle (<sup>) stays as it is
        if len(head) > TITLE_LINE:
            # plotly never wraps a title: at these fonts a long one runs off a figure beside
            # the lecture's words or half a tab's width, so it is broken in two at the space
            # nearest its middle
            spaces = [i for i, ch in enumerate(head) if ch == " "]
            cut = min(spaces, key=lambda i: abs(i - len(head) / 2), default=None)
            if cut is not None:
                # the space stays at the line's end, so the drawn text still reads as words
                fig.update_layout(title_text=f"{head[:cut + 1]}<br>{head[cut + 1:]}{sep}{rest}")
                if any(a.yref == "paper" and (a.y or 0) >= 1 for a in fig.layout.annotations):
                    # subplot titles sit just above the plot: give the second line its room
                    # (the size sweep's "20,000 images" ran into it)
                    fig.update_layout(margin={"t": max(fig.layout.margin.t or 0, 150)})
        legend = fig.layout.legend
        if legend.orientation == "h" and legend.y is not None and legend.y < 0:
            # a legend under the plot, placed relative to the plot area, runs into the axis
            # title at these fonts: pin it to the figure's bottom edge, the plot makes room
            fig.update_layout(legend={"yref": "container", "y": 0, "yanchor": "bottom"})
    return fig

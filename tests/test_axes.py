"""Log-axis tick labels (`explorer.plots.axes`), derived by hand."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from explorer.plots import axes


@pytest.mark.parametrize(("x", "text"), [
    (500, "500"), (150, "150"), (2.1e12, "2.1T"), (2e12, "2T"), (12_300, "12k"),
    (1200, "1.2k"), (6.9e12, "6.9T"), (75e12, "75T"), (3, "3"), (0.25, "0.25")])
def test_si_keeps_two_significant_digits_and_drops_trailing_zeros(x, text):
    assert axes.si(x) == text


def test_log_ticks_are_the_1_2_5_values_inside_the_range():
    # the paper scatter's padded range: 230 … 12,300 TPUv3-core-days, padded to ~155 … 18,000
    assert axes.log_ticks(155, 18_000) == [200, 500, 1000, 2000, 5000, 10_000]
    assert axes.log_ticks(2.1e12, 7.5e13) == pytest.approx([5e12, 1e13, 2e13, 5e13])
    # a range inside one step gets the steps either side, so the axis has two labels
    assert axes.log_ticks(2.2e12, 4.5e12) == pytest.approx([2e12, 5e12])


def test_label_log_axis_writes_whole_labels_at_the_ticks():
    fig = go.Figure(go.Scatter(x=[230, 12_300], y=[1, 2]))
    fig.update_xaxes(type="log")
    axes.label_log_axis(fig, 155, 18_000)
    assert list(fig.layout.xaxis.ticktext) == ["200", "500", "1k", "2k", "5k", "10k"]

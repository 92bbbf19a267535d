"""Tick labels for log axes: plotly labels a log axis's minor ticks with a bare digit ("2 5
1000 2 5 10k": the first "2" is 200), and a data-size axis it labels 500 as "5". These put
whole labels at chosen values instead."""

from __future__ import annotations

import math

SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(x: float, digits: int = 2) -> str:
    """A positive number in SI form with ``digits`` significant digits: 2.1e12 → "2.1T",
    500 → "500", 12,300 → "12k"."""
    scale, prefix = next(((s, p) for s, p in SI if x >= s), (1, ""))
    v = x / scale
    decimals = max(0, digits - (math.floor(math.log10(v)) + 1)) if v > 0 else 0
    text = f"{v:.{decimals}f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + prefix


def log_ticks(low: float, high: float) -> list[float]:
    """The 1-2-5 values of each decade between ``low`` and ``high`` (inclusive), at least
    two of them: 230 … 12,300 → 500, 1000, 2000, 5000, 10000."""
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)) - 1,
                                          math.ceil(math.log10(high)) + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if low <= t <= high]
    if len(inside) >= 2:
        return inside
    # a range inside one 1-2-5 step: the steps either side of it
    below = max((t for t in ticks if t < low), default=low)
    above = min((t for t in ticks if t > high), default=high)
    return sorted({below, *inside, above})


def label_log_axis(fig, low: float, high: float, **selector) -> None:
    """Label a log x axis of ``fig`` at `log_ticks` of [low, high] in `si` form; ``selector``
    picks the axis (``row``/``col`` of a subplot grid)."""
    values = log_ticks(low, high)
    fig.update_xaxes(tickvals=values, ticktext=[si(v) for v in values], **selector)


def size_label(n: int) -> str:
    """A data size as a tick label: 500, 1.2k, 60k (every digit kept)."""
    return f"{n:,}" if n < 1000 else f"{n / 1000:g}k"


def label_sizes(fig) -> None:
    """Ticks at exactly the data sizes drawn on a log x axis (plotly's own would label 500
    as "5")."""
    sizes = sorted({int(x) for t in fig.data for x in (t.x if t.x is not None else ())})
    if sizes:
        fig.update_xaxes(tickvals=sizes, ticktext=[size_label(n) for n in sizes])

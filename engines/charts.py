"""Small SVG charts written by hand: a scatter with a highlighted front, and grouped bars.

No plotting library: the output is plain SVG 1.1 text that browsers, the dashboard and
``xml.etree`` all read. Each chart is a *panel* (a list of SVG elements inside a box); panels are
put side by side in one document with :func:`svg_document`. Every data mark carries a
``data-label`` attribute and a ``<title>`` (the browser's tooltip), so tests and scripts can find
the point of a given variant.

Axis ranges come from :func:`nice_ticks`: 4-6 ticks at 1, 2 or 5 times a power of ten covering
the data. Values that are not finite (an SQNR of infinity for an exact match) are drawn at the
edge of the axis and marked as such in their tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

__all__ = [
    "BarGroup",
    "Box",
    "ScatterPoint",
    "bars_panel",
    "nice_ticks",
    "scatter_panel",
    "svg_document",
]

_FONT = "font-family='sans-serif' font-size='11'"
_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1")
_FRONT_COLOR = "#d62728"
_POINT_COLOR = "#7f7f7f"
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 58.0, 16.0, 30.0, 46.0


@dataclass(frozen=True)
class Box:
    """A panel's rectangle in the document, in SVG user units (pixels)."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class ScatterPoint:
    """One labelled point; ``highlighted`` points are drawn in colour and joined by a line."""

    label: str
    x: float
    y: float
    highlighted: bool = False


@dataclass(frozen=True)
class BarGroup:
    """One group of bars (e.g. a variant), one value per series (e.g. p50, p90, p99)."""

    label: str
    values: tuple[float, ...]


def _fmt(value: float) -> str:
    """Compact text for a number: 3 significant digits, no trailing zeros."""
    if not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return f"{value:.3g}"


def _tick_text(value: float, ticks: Sequence[float]) -> str:
    """A tick label with as many decimals as the tick step needs (0.9992, 0.9994, ...)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{value:.{decimals}f}"


def _num(value: float) -> str:
    return f"{value:.2f}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Evenly spaced round ticks (step 1, 2 or 5 x 10^k) covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tick range must be finite, got [{low}, {high}]")
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(high) * 0.05 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw * (1 - 1e-9))
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


class _Axis:
    """Maps data values on ``ticks``' range to pixel positions ``[start, end]``."""

    def __init__(self, values: Sequence[float], start: float, end: float, zero: bool) -> None:
        finite = [v for v in values if math.isfinite(v)]
        if zero:
            finite.append(0.0)
        low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
        self.ticks = nice_ticks(low, high)
        self.low, self.high = self.ticks[0], self.ticks[-1]
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        if math.isnan(value):
            value = self.low
        value = min(max(value, self.low), self.high)  # +-inf land on the edges
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)


def _frame(
    box: Box, title: str, x_label: str, y_label: str
) -> tuple[list[str], float, float, float, float]:
    """Title, axis labels; returns the elements and the plot area (left, top, right, bottom)."""
    left, top = box.x + _MARGIN_LEFT, box.y + _MARGIN_TOP
    right, bottom = box.x + box.width - _MARGIN_RIGHT, box.y + box.height - _MARGIN_BOTTOM
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    out = [
        f"<text class='title' x='{_num(mid_x)}' y='{_num(box.y + 18)}' text-anchor='middle' "
        f"font-family='sans-serif' font-size='13' font-weight='bold'>{escape(title)}</text>",
        f"<text class='axis-label' x='{_num(mid_x)}' y='{_num(box.y + box.height - 8)}' "
        f"text-anchor='middle' {_FONT}>{escape(x_label)}</text>",
        f"<text class='axis-label' x='{_num(box.x + 14)}' y='{_num(mid_y)}' text-anchor='middle' "
        f"transform='rotate(-90 {_num(box.x + 14)} {_num(mid_y)})' {_FONT}>{escape(y_label)}</text>",
        f"<rect x='{_num(left)}' y='{_num(top)}' width='{_num(right - left)}' "
        f"height='{_num(bottom - top)}' fill='none' stroke='#999'/>",
    ]
    return out, left, top, right, bottom


def _y_ticks(axis: _Axis, left: float, right: float) -> list[str]:
    out = []
    for tick in axis.ticks:
        y = axis(tick)
        out.append(
            f"<line x1='{_num(left)}' y1='{_num(y)}' x2='{_num(right)}' y2='{_num(y)}' "
            "stroke='#e5e5e5'/>"
        )
        out.append(
            f"<text x='{_num(left - 4)}' y='{_num(y + 4)}' text-anchor='end' {_FONT}>"
            f"{escape(_tick_text(tick, axis.ticks))}</text>"
        )
    return out


def scatter_panel(
    points: Sequence[ScatterPoint], box: Box, *, title: str, x_label: str, y_label: str
) -> list[str]:
    """A scatter of ``points``; highlighted ones in colour, joined in order of x (a front line)."""
    out, left, top, right, bottom = _frame(box, title, x_label, y_label)
    x_axis = _Axis([p.x for p in points], left + 8, right - 8, zero=False)
    y_axis = _Axis([p.y for p in points], bottom - 8, top + 8, zero=False)
    out += _y_ticks(y_axis, left, right)
    for tick in x_axis.ticks:
        x = x_axis(tick)
        out.append(
            f"<text x='{_num(x)}' y='{_num(bottom + 14)}' text-anchor='middle' {_FONT}>"
            f"{escape(_tick_text(tick, x_axis.ticks))}</text>"
        )
    front = sorted((p for p in points if p.highlighted), key=lambda p: (p.x, -p.y))
    if len(front) > 1:
        path = " ".join(f"{_num(x_axis(p.x))},{_num(y_axis(p.y))}" for p in front)
        out.append(
            f"<polyline class='front' points='{path}' fill='none' stroke='{_FRONT_COLOR}' "
            "stroke-width='1.5' stroke-dasharray='4 3'/>"
        )
    for p in points:
        cx, cy = x_axis(p.x), y_axis(p.y)
        cls = "point front" if p.highlighted else "point"
        color = _FRONT_COLOR if p.highlighted else _POINT_COLOR
        tip = f"{p.label}: {x_label} {_fmt(p.x)}, {y_label} {_fmt(p.y)}"
        if not (math.isfinite(p.x) and math.isfinite(p.y)):
            tip += " (drawn at the axis edge)"
        out.append(
            f"<circle class={quoteattr(cls)} data-label={quoteattr(p.label)} cx='{_num(cx)}' "
            f"cy='{_num(cy)}' r='5' fill='{color}' stroke='#333'><title>{escape(tip)}</title>"
            "</circle>"
        )
        out.append(
            f"<text class='point-label' x='{_num(cx + 7)}' y='{_num(cy - 7)}' {_FONT}>"
            f"{escape(p.label)}</text>"
        )
    return out


def bars_panel(
    groups: Sequence[BarGroup],
    series: Sequence[str],
    box: Box,
    *,
    title: str,
    y_label: str,
) -> list[str]:
    """Grouped vertical bars from zero: one group per entry, one bar per series, with a legend."""
    out, left, top, right, bottom = _frame(box, title, "", y_label)
    y_axis = _Axis([v for g in groups for v in g.values], bottom, top + 14, zero=True)
    out += _y_ticks(y_axis, left, right)
    slot = (right - left) / max(len(groups), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for i, group in enumerate(groups):
        x0 = left + i * slot + slot * 0.1
        for j, value in enumerate(group.values):
            y = y_axis(value)
            tip = f"{group.label} {series[j] if j < len(series) else j}: {_fmt(value)}"
            out.append(
                f"<rect class='bar' data-label={quoteattr(group.label)} "
                f"data-series={quoteattr(series[j] if j < len(series) else str(j))} "
                f"x='{_num(x0 + j * bar)}' y='{_num(y)}' width='{_num(bar * 0.92)}' "
                f"height='{_num(max(y_axis(0.0) - y, 0.0))}' "
                f"fill='{_PALETTE[j % len(_PALETTE)]}'><title>{escape(tip)}</title></rect>"
            )
        out.append(
            f"<text x='{_num(left + (i + 0.5) * slot)}' y='{_num(bottom + 14)}' "
            f"text-anchor='middle' {_FONT}>{escape(group.label)}</text>"
        )
    for j, name in enumerate(series):
        lx = right - 70 * (len(series) - j)
        out.append(
            f"<rect x='{_num(lx)}' y='{_num(top + 3)}' width='10' height='10' "
            f"fill='{_PALETTE[j % len(_PALETTE)]}'/>"
        )
        out.append(f"<text x='{_num(lx + 14)}' y='{_num(top + 12)}' {_FONT}>{escape(name)}</text>")
    return out


def svg_document(width: float, height: float, body: Sequence[str], *, title: str) -> str:
    """A standalone SVG document of ``width`` x ``height`` holding the panels' elements."""
    return "\n".join(
        [
            "<?xml version='1.0' encoding='UTF-8'?>",
            f"<svg xmlns='http://www.w3.org/2000/svg' version='1.1' width='{_num(width)}' "
            f"height='{_num(height)}' viewBox='0 0 {_num(width)} {_num(height)}'>",
            f"<title>{escape(title)}</title>",
            f"<rect width='{_num(width)}' height='{_num(height)}' fill='white'/>",
            *body,
            "</svg>",
            "",
        ]
    )

"""Small SVG charts written by hand: a scatter with a highlighted front, and grouped bars.

No plotting library: the output is plain SVG 1.1 text that browsers, the dashboard and
``xml.etree`` all read. Each chart is a *panel* (a list of SVG elements inside a box); panels are
put side by side in one document with :func:`svg_document`. Every data mark carries a
``data-label`` attribute and a ``<title>`` (the browser's tooltip), so tests and scripts can find
the point of a given variant.

Text is laid out without a font engine: a label's box is estimated as ``len(text) x 0.6 x
font-size`` wide (sans-serif averages 0.5-0.55 em a character, so the estimate errs wide) and
from ``font-size`` above its baseline to a quarter of it below. Point labels are placed beside
their point where their boxes meet no other label and no other point, else moved up or down
(with a leader line) until they do; group labels, titles and axis labels that do not fit their
space are set smaller, then wrapped at ``:``, ``-``, ``_``, ``/`` or spaces, so every label
stays inside the document and no two overlap.

Axis ranges come from :func:`nice_ticks`: 4-6 ticks at 1, 2 or 5 times a power of ten covering
the data. Values that are not finite (an SQNR of infinity for an exact match) are drawn at the
edge of the axis and marked as such in their tooltip.
"""

from __future__ import annotations

import math
import re
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
    "text_width",
]

_FONT_SIZE = 11.0
_MIN_FONT_SIZE = 7.0
_SMALLEST_UNWRAPPED = 9.0
"""Labels shrink to this size on one line before they are wrapped."""
_CHAR_EM = 0.6
_ASCENT_EM, _DESCENT_EM = 1.0, 0.25
_LINE_EM = 1.3
"""Line spacing in em: more than a box's height (ascent + descent), so lines never touch."""
_POINT_R = 5.0
_LABEL_GAP = 7.0
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


@dataclass(frozen=True)
class _Rect:
    left: float
    top: float
    right: float
    bottom: float

    def intersects(self, other: _Rect) -> bool:
        return (
            self.left < other.right
            and other.left < self.right
            and self.top < other.bottom
            and other.top < self.bottom
        )

    def within(self, other: _Rect) -> bool:
        return (
            self.left >= other.left
            and self.right <= other.right
            and self.top >= other.top
            and self.bottom <= other.bottom
        )


def text_width(text: str, font_size: float) -> float:
    """The estimated width of ``text`` at ``font_size`` (module docstring)."""
    return len(text) * font_size * _CHAR_EM


def _text_box(x: float, y: float, text: str, font_size: float, anchor: str) -> _Rect:
    width = text_width(text, font_size)
    left = x - width / 2 if anchor == "middle" else (x - width if anchor == "end" else x)
    return _Rect(left, y - _ASCENT_EM * font_size, left + width, y + _DESCENT_EM * font_size)


def _text(
    x: float,
    y: float,
    text: str,
    *,
    size: float = _FONT_SIZE,
    anchor: str = "start",
    extra: str = "",
) -> str:
    """One ``<text>`` element; every one states its anchor and size (the layout depends on it)."""
    return (
        f"<text{extra} x='{_num(x)}' y='{_num(y)}' text-anchor='{anchor}' "
        f"font-family='sans-serif' font-size='{size:g}'>{escape(text)}</text>"
    )


def _wrap(text: str, chars: int) -> list[str]:
    """``text`` in lines of at most ``chars`` characters, broken after ``:-_/`` or spaces where
    possible, else inside a word."""
    pieces = [p for p in re.findall(r"[^:_/\- ]*[:_/\- ]?", text) if p]
    lines: list[str] = []
    line = ""
    for piece in pieces:
        while len(piece) > chars:
            if line:
                lines.append(line)
                line = ""
            lines.append(piece[:chars])
            piece = piece[chars:]
        if len(line) + len(piece) > chars:
            lines.append(line)
            line = ""
        line += piece
    if line:
        lines.append(line)
    return [ln.rstrip() for ln in lines]


def _fit(
    text: str, width: float, max_lines: int, size: float = _FONT_SIZE
) -> tuple[list[str], float]:
    """Lines and font size that set ``text`` within ``width`` in at most ``max_lines`` lines:
    smaller on one line down to 9, then wrapped (smaller still if needed); at the smallest size
    the last line is cut with an ellipsis (the full text stays in the element's tooltip)."""
    current = size
    while current >= min(_SMALLEST_UNWRAPPED, size):
        if text_width(text, current) <= width:
            return [text], current
        current -= 0.5
    current = min(_SMALLEST_UNWRAPPED, size)
    while True:
        chars = max(int(width / (current * _CHAR_EM)), 1)
        lines = _wrap(text, chars)
        if len(lines) <= max_lines:
            return lines, current
        if current <= _MIN_FONT_SIZE:
            kept = lines[:max_lines]
            kept[-1] = kept[-1][: max(chars - 1, 0)] + "\u2026"
            return kept, current
        current -= 0.5


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


_Y_LABEL_X = 14.0
"""The rotated y-axis label's baseline, from the panel's left edge."""


def _frame(
    box: Box, title: str, x_label: str, y_label: str
) -> tuple[list[str], float, float, float, float]:
    """Title, axis labels; returns the elements and the plot area (left, top, right, bottom)."""
    left, top = box.x + _MARGIN_LEFT, box.y + _MARGIN_TOP
    right, bottom = box.x + box.width - _MARGIN_RIGHT, box.y + box.height - _MARGIN_BOTTOM
    mid_y = (top + bottom) / 2
    title_lines, title_size = _fit(title, box.width - 8, 1, 13.0)
    out = [
        f"<text class='title' x='{_num(box.x + box.width / 2)}' y='{_num(box.y + 18)}' "
        f"text-anchor='middle' font-family='sans-serif' font-size='{title_size:g}' "
        f"font-weight='bold'>{escape(title_lines[0])}</text>",
    ]
    if x_label:
        lines, size = _fit(x_label, box.width - 8, 1)
        out.append(
            _text(
                box.x + box.width / 2,
                box.y + box.height - 8,
                lines[0],
                size=size,
                anchor="middle",
                extra=" class='axis-label'",
            )
        )
    if y_label:
        lines, size = _fit(y_label, bottom - top, 1)
        x = box.x + _Y_LABEL_X
        out.append(
            f"<text class='axis-label' x='{_num(x)}' y='{_num(mid_y)}' text-anchor='middle' "
            f"transform='rotate(-90 {_num(x)} {_num(mid_y)})' font-family='sans-serif' "
            f"font-size='{size:g}'>{escape(lines[0])}</text>"
        )
    out.append(
        f"<rect x='{_num(left)}' y='{_num(top)}' width='{_num(right - left)}' "
        f"height='{_num(bottom - top)}' fill='none' stroke='#999'/>"
    )
    return out, left, top, right, bottom


def _y_ticks(axis: _Axis, box: Box, left: float, right: float) -> list[str]:
    """Grid lines and tick labels, set small enough to clear the rotated y-axis label."""
    texts = [_tick_text(tick, axis.ticks) for tick in axis.ticks]
    room = (left - 4) - (box.x + _Y_LABEL_X + _DESCENT_EM * _FONT_SIZE + 2)
    size = _FONT_SIZE
    while size > _MIN_FONT_SIZE and max(text_width(t, size) for t in texts) > room:
        size -= 0.5
    out = []
    for tick, text in zip(axis.ticks, texts, strict=True):
        y = axis(tick)
        out.append(
            f"<line x1='{_num(left)}' y1='{_num(y)}' x2='{_num(right)}' y2='{_num(y)}' "
            "stroke='#e5e5e5'/>"
        )
        out.append(_text(left - 4, y + 4, text, size=size, anchor="end"))
    return out


def _label_candidates(
    cx: float, cy: float, width: float, size: float, area: _Rect
) -> list[tuple[float, float, str]]:
    """Baselines and anchors for a point's label: beside it above, below, then further up and
    down in steps of one line, right of the point first."""
    above = cy - _LABEL_GAP
    below = cy + _LABEL_GAP + _ASCENT_EM * size
    step = size * _LINE_EM + 1
    steps = int((area.bottom - area.top) / step) + 1
    sides = ((cx + _LABEL_GAP, "start"), (cx - _LABEL_GAP, "end"))
    out = [(x, y, anchor) for y in (above, below) for x, anchor in sides]
    for k in range(1, steps + 1):
        for y in (above - k * step, below + k * step):
            out += [(x, y, anchor) for x, anchor in sides]
    return out


def _place_labels(
    points: Sequence[tuple[float, float, str]], area: _Rect
) -> list[tuple[float, float, str, float]]:
    """Per point (cx, cy, text): the label's baseline x, y, anchor and font size, so that no two
    labels overlap and each lies in ``area`` (avoiding other points where it can)."""
    dots = [
        _Rect(cx - _POINT_R, cy - _POINT_R, cx + _POINT_R, cy + _POINT_R) for cx, cy, _ in points
    ]
    placed: list[_Rect] = []
    out = []
    for i, (cx, cy, text) in enumerate(points):
        lines, size = _fit(text, area.right - area.left - 2 * _LABEL_GAP, 1)
        candidates = _label_candidates(cx, cy, text_width(lines[0], size), size, area)
        boxes = [(c, _text_box(c[0], c[1], lines[0], size, c[2])) for c in candidates]
        inside = [(c, b) for c, b in boxes if b.within(area)] or boxes
        others = [d for j, d in enumerate(dots) if j != i]
        chosen = next(
            (c for c, b in inside if not any(b.intersects(o) for o in placed + others)),
            None,
        ) or next((c for c, b in inside if not any(b.intersects(o) for o in placed)), inside[0][0])
        placed.append(_text_box(chosen[0], chosen[1], lines[0], size, chosen[2]))
        out.append((*chosen, size))
    return out


def scatter_panel(
    points: Sequence[ScatterPoint], box: Box, *, title: str, x_label: str, y_label: str
) -> list[str]:
    """A scatter of ``points``; highlighted ones in colour, joined in order of x (a front line)."""
    out, left, top, right, bottom = _frame(box, title, x_label, y_label)
    x_axis = _Axis([p.x for p in points], left + 8, right - 8, zero=False)
    y_axis = _Axis([p.y for p in points], bottom - 8, top + 8, zero=False)
    out += _y_ticks(y_axis, box, left, right)
    for tick in x_axis.ticks:
        out.append(
            _text(x_axis(tick), bottom + 14, _tick_text(tick, x_axis.ticks), anchor="middle")
        )
    front = sorted((p for p in points if p.highlighted), key=lambda p: (p.x, -p.y))
    if len(front) > 1:
        path = " ".join(f"{_num(x_axis(p.x))},{_num(y_axis(p.y))}" for p in front)
        out.append(
            f"<polyline class='front' points='{path}' fill='none' stroke='{_FRONT_COLOR}' "
            "stroke-width='1.5' stroke-dasharray='4 3'/>"
        )
    centres = [(x_axis(p.x), y_axis(p.y), p.label) for p in points]
    labels = _place_labels(centres, _Rect(left + 2, top + 2, right - 2, bottom - 2))
    for p, (cx, cy, _), (lx, ly, anchor, size) in zip(points, centres, labels, strict=True):
        cls = "point front" if p.highlighted else "point"
        color = _FRONT_COLOR if p.highlighted else _POINT_COLOR
        tip = f"{p.label}: {x_label} {_fmt(p.x)}, {y_label} {_fmt(p.y)}"
        if not (math.isfinite(p.x) and math.isfinite(p.y)):
            tip += " (drawn at the axis edge)"
        out.append(
            f"<circle class={quoteattr(cls)} data-label={quoteattr(p.label)} cx='{_num(cx)}' "
            f"cy='{_num(cy)}' r='{_POINT_R:g}' fill='{color}' stroke='#333'>"
            f"<title>{escape(tip)}</title></circle>"
        )
        text, _ = _fit(p.label, right - left - 4 - 2 * _LABEL_GAP, 1)
        mid_y = ly - (_ASCENT_EM - _DESCENT_EM) * size / 2
        if abs(mid_y - cy) > _LABEL_GAP + size:  # moved away from its point: a leader line
            out.append(
                f"<line class='leader' x1='{_num(cx)}' y1='{_num(cy)}' x2='{_num(lx)}' "
                f"y2='{_num(mid_y)}' stroke='#bbb'/>"
            )
        out.append(
            _text(
                lx,
                ly,
                text[0],
                size=size,
                anchor=anchor,
                extra=f" class='point-label' data-label={quoteattr(p.label)}",
            )
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
    """Grouped vertical bars from zero: one group per entry, one bar per series, with a legend.

    Group labels that do not fit their slot are set smaller, then wrapped (module docstring)."""
    out, left, top, right, bottom = _frame(box, title, "", y_label)
    y_axis = _Axis([v for g in groups for v in g.values], bottom, top + 14, zero=True)
    out += _y_ticks(y_axis, box, left, right)
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
        out += _group_label(group.label, left + (i + 0.5) * slot, slot - 4, bottom, box)
    for j, name in enumerate(series):
        lx = right - 70 * (len(series) - j)
        out.append(
            f"<rect x='{_num(lx)}' y='{_num(top + 3)}' width='10' height='10' "
            f"fill='{_PALETTE[j % len(_PALETTE)]}'/>"
        )
        out.append(_text(lx + 14, top + 12, name))
    return out


def _group_label(label: str, x: float, width: float, bottom: float, box: Box) -> list[str]:
    """A group's label under the plot, one ``<text>`` per line, within ``width`` and the panel."""
    room = box.y + box.height - 2 - (bottom + 3)

    def lines_fitting(size: float) -> int:
        return max(int((room - (_ASCENT_EM + _DESCENT_EM) * size) / (size * _LINE_EM)) + 1, 1)

    lines, size = _fit(label, width, lines_fitting(_SMALLEST_UNWRAPPED))
    if len(lines) > lines_fitting(size):
        lines, size = _fit(label, width, lines_fitting(size), size)
    first = bottom + 3 + _ASCENT_EM * size
    return [
        _text(
            x,
            first + k * size * _LINE_EM,
            line,
            size=size,
            anchor="middle",
            extra=f" class='group-label' data-label={quoteattr(label)}",
        )
        for k, line in enumerate(lines)
    ]


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

"""The sweep chart's labels never overlap and never leave the picture, checked on the SVG's
geometry: each ``<text>``'s box from its x, y, font size, anchor, rotation and text length."""

from __future__ import annotations

import itertools
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from calibrators.data import CalibrationDataset
from engines.charts import BarGroup, Box, ScatterPoint, bars_panel, scatter_panel, svg_document
from engines.perf_report import BenchmarkOptions
from engines.spec import BackendName
from engines.sweep import sweep
from engines.sweep_report import SweepReport, render_svg

SVG = "{http://www.w3.org/2000/svg}"
CHAR_EM = 0.6
"""Width of a character in em: sans-serif averages 0.5-0.55, so boxes err wide."""
LONG = "auto:top1_agreement:0.95"


@dataclass(frozen=True)
class Rect:
    left: float
    top: float
    right: float
    bottom: float
    text: str

    def overlaps(self, other: Rect) -> bool:
        return (
            self.left < other.right
            and other.left < self.right
            and self.top < other.bottom
            and other.top < self.bottom
        )


def _rotate(x: float, y: float, degrees: float, cx: float, cy: float) -> tuple[float, float]:
    a = math.radians(degrees)
    dx, dy = x - cx, y - cy
    return cx + dx * math.cos(a) - dy * math.sin(a), cy + dx * math.sin(a) + dy * math.cos(a)


def text_boxes(svg: str) -> tuple[list[Rect], Rect]:
    """Every ``<text>``'s box (ascent one font size, descent a quarter) and the viewBox."""
    root = ET.fromstring(svg)
    x0, y0, w, h = (float(v) for v in root.get("viewBox", "").split())
    boxes = []
    for el in root.iter(f"{SVG}text"):
        text = "".join(el.itertext())
        size = float(el.get("font-size", "16"))
        x, y = float(el.get("x", "0")), float(el.get("y", "0"))
        width = len(text) * size * CHAR_EM
        anchor = el.get("text-anchor", "start")
        left = x - width / 2 if anchor == "middle" else x - width if anchor == "end" else x
        corners = [(left, y - size), (left + width, y - size), (left, y + size / 4)]
        corners.append((left + width, y + size / 4))
        rotation = re.fullmatch(r"rotate\(([-\d.]+) ([-\d.]+) ([-\d.]+)\)", el.get("transform", ""))
        if rotation:
            degrees, cx, cy = (float(g) for g in rotation.groups())
            corners = [_rotate(px, py, degrees, cx, cy) for px, py in corners]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        boxes.append(Rect(min(xs), min(ys), max(xs), max(ys), text))
    return boxes, Rect(x0, y0, x0 + w, y0 + h, "viewBox")


def assert_labels_laid_out(svg: str) -> list[Rect]:
    boxes, view = text_boxes(svg)
    eps = 1e-6
    for b in boxes:
        assert view.left - eps <= b.left and b.right <= view.right + eps, f"{b.text!r} leaves x"
        assert view.top - eps <= b.top and b.bottom <= view.bottom + eps, f"{b.text!r} leaves y"
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), f"{a.text!r} overlaps {b.text!r}"
    return boxes


@pytest.fixture(scope="module")
def crowded_report(tiny_cnn_path: Path, tmp_path_factory: pytest.TempPathFactory) -> SweepReport:
    """A real fp32/fp16 sweep, then fp16 moved onto fp32's point and auto variants with long
    names added at nearly the same place (what CPUs give: FP16 no faster, as accurate)."""
    rng = np.random.default_rng(0)
    data = CalibrationDataset.from_arrays(
        {"image": rng.normal(0, 1, (24, 3, 16, 16)).astype(np.float32)}
    )
    report = sweep(
        tiny_cnn_path,
        data,
        ["fp32", "fp16"],
        out_dir=tmp_path_factory.mktemp("chart"),
        backend=BackendName.ONNXRUNTIME,
        eval_fraction=0.25,
        benchmark_options=BenchmarkOptions(warmup_ms=0, duration_s=0.05, iterations=3),
    )
    fp32, fp16 = report.variants
    near = {"latency_p50_ms": fp32.latency_p50_ms * 1.002, "accuracy_value": fp32.accuracy_value}
    crowd = [fp32, fp16.model_copy(update=near)]
    for i, name in enumerate((LONG, "auto:int8-fp16:top1_agreement:0.995", "int8", "int8-fp16")):
        crowd.append(
            fp16.model_copy(
                update={
                    "name": name,
                    "latency_p50_ms": fp32.latency_p50_ms * (1.0 + 0.001 * i),
                    "accuracy_value": fp32.accuracy_value - 0.0001 * i,
                }
            )
        )
    return report.model_copy(update={"variants": crowd})


def test_sweep_chart_labels_neither_overlap_nor_leave_the_picture(
    crowded_report: SweepReport,
) -> None:
    svg = render_svg(crowded_report)
    boxes = assert_labels_laid_out(svg)
    root = ET.fromstring(svg)
    names = [v.name for v in crowded_report.variants]
    point_labels = [el for el in root.iter(f"{SVG}text") if el.get("class") == "point-label"]
    assert sorted("".join(el.itertext()) for el in point_labels) == sorted(names)
    # Each variant's name under its bars, whole (wrapped into lines where it is long).
    for name in names:
        lines = [
            "".join(el.itertext())
            for el in root.iter(f"{SVG}text")
            if el.get("class") == "group-label" and el.get("data-label") == name
        ]
        assert "".join(lines) == name
    assert any(b.text == "top1_agreement" for b in boxes)  # the y-axis label, rotated


def test_a_pile_of_identical_points_and_long_names_still_fits() -> None:
    names = [f"auto:top1_agreement:0.9{i}" for i in range(8)]
    points = [ScatterPoint(n, 1.0, 0.5, highlighted=i % 2 == 0) for i, n in enumerate(names)]
    groups = [BarGroup(n, (1.0, 2.0, 3.0)) for n in names]
    body = [
        *scatter_panel(
            points, Box(0, 0, 490, 420), title="t", x_label="p50 latency (ms)", y_label="y"
        ),
        *bars_panel(groups, ("p50", "p90", "p99"), Box(490, 0, 490, 420), title="b", y_label="ms"),
    ]
    svg = svg_document(980, 420, body, title="pile")
    assert_labels_laid_out(svg)
    root = ET.fromstring(svg)
    leaders = [el for el in root.iter(f"{SVG}line") if el.get("class") == "leader"]
    assert leaders  # labels moved away from their points are tied to them


def test_a_label_too_long_for_any_wrapping_is_cut_but_still_fits() -> None:
    name = "x" * 400
    body = bars_panel([BarGroup(name, (1.0,))], ("p50",), Box(0, 0, 200, 200), title="t", y_label="")
    svg = svg_document(200, 200, body, title="long")
    boxes = assert_labels_laid_out(svg)
    assert any(b.text.endswith("\u2026") for b in boxes)

"""Variant sweeps: the report, its Pareto front, and the Markdown/JSON/SVG files."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import method_spec
from engines.accuracy_report import AccuracyMetric
from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.charts import nice_ticks
from engines.errors import SpecError
from engines.perf_report import BenchmarkOptions
from engines.spec import BackendName, BuildSpec, Precision
from engines.sweep import Variant, parse_variants, sweep
from engines.sweep_report import (
    Fp32Ratios,
    SweepReport,
    pareto_front,
    ratios_vs_fp32,
    render_markdown,
    render_svg,
)
from engines.workflow import Workflow
from tests import zoo

SVG = "{http://www.w3.org/2000/svg}"
QUICK = BenchmarkOptions(warmup_ms=10, duration_s=0.2, iterations=5)


def test_pareto_front_on_a_constructed_example() -> None:
    #            fp32   fp16   int8   slow+bad  tie-with-int8  mixed
    latency = [10.0, 6.0, 3.0, 12.0, 3.0, 4.0]
    accuracy = [1.0, 0.999, 0.95, 0.9, 0.95, 0.99]
    assert pareto_front(latency, accuracy) == [True, True, True, False, True, True]
    # Lower-is-better metrics flip the accuracy axis: 0.05 error beats 0.1.
    assert pareto_front([1.0, 2.0, 2.0], [0.1, 0.05, 0.2], higher_is_better=False) == [
        True,
        True,
        False,
    ]
    # Dominated in one axis while tied in the other.
    assert pareto_front([1.0, 1.0], [0.5, 0.6]) == [False, True]
    assert pareto_front([1.0, 2.0], [0.5, 0.5]) == [True, False]
    assert pareto_front([1.0, 2.0], [math.nan, 0.1]) == [True, True]
    assert pareto_front([2.0, 1.0], [math.nan, 0.1]) == [False, True]


def test_ratios_vs_fp32_divide_by_the_fp32_variant_and_skip_what_cannot_be_divided() -> None:
    latencies, sizes = [8.0, 2.0, 0.0], [400, 100, 200]
    assert ratios_vs_fp32(latencies, sizes, 0) == [
        Fp32Ratios(1.0, 1.0),
        Fp32Ratios(4.0, 0.25),
        Fp32Ratios(None, 0.5),  # an unmeasured latency has no speedup
    ]
    assert ratios_vs_fp32(latencies, sizes, None) == [Fp32Ratios(None, None)] * 3
    assert ratios_vs_fp32([8.0, 2.0], [0, 100], 0)[1] == Fp32Ratios(4.0, None)
    with pytest.raises(ValueError, match="one size per latency"):
        ratios_vs_fp32([1.0], [], None)


def test_variant_parsing() -> None:
    assert Variant.parse("int8-fp16").precision is Precision.INT8_FP16
    auto = Variant.parse("auto:cosine:0.999")
    assert auto.precision is Precision.INT8 and auto.budget is not None
    assert auto.budget.metric is AccuracyMetric.COSINE and auto.budget.value == 0.999
    assert Variant.parse("auto:int8-fp16:sqnr_db:30").precision is Precision.INT8_FP16
    for bad in ("int4", "auto:cosine", "auto:fp16:cosine:0.9", "auto:nope:1"):
        with pytest.raises(SpecError):
            Variant.parse(bad)
    with pytest.raises(SpecError, match="twice"):
        parse_variants(["fp32", "int8", "fp32"])
    with pytest.raises(SpecError):
        parse_variants([])


def test_the_sweep_holds_out_what_the_dataset_split_holds_out(
    tiny_cnn_path: Path, tmp_path: Path
) -> None:
    data = CalibrationDataset.from_arrays(
        {"image": np.random.default_rng(0).random((20, 3, 16, 16), dtype=np.float32)}
    )
    flow = Workflow(tiny_cnn_path, BuildSpec(precision="fp32", backend="onnxruntime"))
    split = flow.split(data, eval_fraction=0.2, seed=3)
    cal, held = data.split(0.2, seed=3)
    assert split.held_out and split.total == 20
    assert (split.calibration.digest, split.evaluation.digest) == (cal.digest, held.digest)


def test_nice_ticks_cover_the_range() -> None:
    ticks = nice_ticks(0.93, 1.0)
    assert ticks[0] <= 0.93 and ticks[-1] >= 1.0 and 3 <= len(ticks) <= 8
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    assert nice_ticks(5.0, 5.0)[0] < 5.0 < nice_ticks(5.0, 5.0)[-1]


def _check_files(report: SweepReport, out: Path) -> ET.Element:
    names = [v.name for v in report.variants]
    loaded = SweepReport.model_validate_json((out / "sweep.json").read_text())
    assert loaded == report
    markdown = (out / "sweep.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "|---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == names
    root = ET.fromstring((out / "sweep.svg").read_text())
    points = [c for c in root.iter(f"{SVG}circle") if "point" in c.get("class", "").split()]
    assert sorted(p.get("data-label", "") for p in points) == sorted(names)
    front = {p.get("data-label") for p in points if "front" in p.get("class", "").split()}
    assert front == set(report.pareto_front)
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len(bars) == 3 * len(names)
    return root


def test_sweep_tiny_cnn(tiny_cnn_path: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = CalibrationDataset.from_arrays(
        {"image": rng.normal(0, 1, (80, 3, 16, 16)).astype(np.float32)}
    )
    report = sweep(
        tiny_cnn_path,
        data,
        ["fp32", "fp16", "int8"],
        out_dir=tmp_path,
        backend=BackendName.ONNXRUNTIME,
        eval_fraction=0.25,
        benchmark_options=QUICK,
    )
    assert [v.name for v in report.variants] == ["fp32", "fp16", "int8"]
    assert report.backend == "onnxruntime" and report.eval_samples == 20
    assert report.calibration_samples == 60 and report.table_sha256 is not None
    assert report.accuracy_metric is AccuracyMetric.TOP1_AGREEMENT  # logits [N, 10]
    fp32, fp16, int8 = report.variants
    assert fp32.speedup_vs_fp32 == pytest.approx(1.0)
    for v in report.variants:
        assert v.speedup_vs_fp32 == pytest.approx(fp32.latency_p50_ms / v.latency_p50_ms)
        assert v.latency_p50_ms <= v.latency_p90_ms <= v.latency_p99_ms
        assert v.throughput_qps > 0 and v.size_bytes > 0 and v.perf.duration_s == 0.2
        assert (tmp_path / v.artifact).is_file() and v.accuracy.samples == 20
        assert v.accuracy_value == v.accuracy.metric(AccuracyMetric.TOP1_AGREEMENT)
    assert fp16.size_bytes < 0.75 * fp32.size_bytes  # FP16 weights
    assert fp32.accuracy_value == 1.0 and fp32.accuracy.output("logits").max_abs_error < 1e-5
    assert int8.int8_share == 1.0 and fp32.int8_share is None
    assert 0 < int8.accuracy.output("logits").cosine_similarity < 1.0
    expected = pareto_front(
        [v.latency_p50_ms for v in report.variants], [v.accuracy_value for v in report.variants]
    )
    assert [v.pareto for v in report.variants] == expected and any(expected)
    _check_files(report, tmp_path)
    _check_fp32_notes(report)


def _check_fp32_notes(report: SweepReport) -> None:
    """Speed and size against FP32 in the Markdown, with the reasons the recorded facts give."""
    fp32, fp16, int8 = report.variants
    assert fp32.size_vs_fp32 == 1.0 and fp16.size_vs_fp32 == fp16.size_bytes / fp32.size_bytes
    assert int8.size_vs_fp32 == int8.size_bytes / fp32.size_bytes
    assert int8.size_vs_fp32 is not None and int8.size_vs_fp32 > 0.9  # Q/DQ on FP32 weights
    markdown = render_markdown(report)
    assert "| speedup vs fp32 | size vs fp32 |" in markdown
    int8_line = next(line for line in markdown.splitlines() if line.startswith("- int8: "))
    assert f"INT8 is {int8.speedup_vs_fp32:.2f}x FP32 speed here" in int8_line
    assert f"size {int8.size_vs_fp32:.2f}x FP32: ONNX Q/DQ keeps FP32 weights" in int8_line
    # The same numbers on a CPU without VNNI (weight levels 63), FP16 and INT8 slower than FP32.
    slow = report.model_copy(
        update={
            "int8_weight_levels": 63,
            "variants": [
                fp32,
                fp16.model_copy(update={"speedup_vs_fp32": 0.8}),
                int8.model_copy(update={"speedup_vs_fp32": 0.32}),
            ],
        }
    )
    lines = render_markdown(slow).splitlines()
    assert (
        f"- int8: INT8 is 0.32x FP32 speed here: ONNX Runtime on this CPU has no VNNI INT8 "
        f"kernels; TensorRT on a GPU is where INT8 pays; size {int8.size_vs_fp32:.2f}x FP32: "
        "ONNX Q/DQ keeps FP32 weights (ONNX Runtime quantizes them when it loads the model)."
    ) in lines
    fp16_line = next(line for line in lines if line.startswith("- fp16: "))
    assert "FP16 is 0.80x FP32 speed here: ONNX Runtime's CPU provider has few FP16" in fp16_line
    # With full 8-bit weights no VNNI reason is claimed, only that it is slower here.
    vnni = slow.model_copy(update={"int8_weight_levels": 127})
    assert "INT8 is 0.32x FP32 speed here: slower than FP32 on this machine;" in render_markdown(
        vnni
    )


def test_sweep_with_a_separate_eval_dataset_and_a_given_table(
    tiny_cnn_path: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    calib = CalibrationDataset.from_arrays(
        {"image": rng.normal(0, 1, (24, 3, 16, 16)).astype(np.float32)}
    )
    evaluation = CalibrationDataset.from_arrays(
        {"image": rng.normal(0, 1, (10, 3, 16, 16)).astype(np.float32)}
    )
    table = calibrate(tiny_cnn_path, calib, method_spec("minmax"))
    labels = np.arange(10) % 10
    report = sweep(
        tiny_cnn_path,
        calib,
        ["fp32", "int8"],
        out_dir=tmp_path,
        backend=BackendName.ONNXRUNTIME,
        eval_dataset=evaluation,
        table=table,
        labels=labels,
        benchmark_options=QUICK,
    )
    assert report.eval_samples == 10 and report.calibration_samples == 24
    assert report.table_sha256 == table.digest  # the given table, not a fresh entropy one
    assert report.calibration is not None and report.calibration.method == "minmax"
    assert report.accuracy_metric is AccuracyMetric.ACCURACY  # labels of the eval samples
    fp32, int8 = report.variants
    assert fp32.accuracy.samples == int8.accuracy.samples == 10
    assert fp32.accuracy.output("logits").accuracy_drop == 0.0

    with pytest.raises(SpecError, match="10 labels for a dataset of 24") as too_few:
        sweep(tiny_cnn_path, calib, ["fp32"], out_dir=tmp_path / "x", labels=labels)
    assert too_few.value.field == "labels"
    foreign = table.model_copy(update={"amax": {"not_in_model": 1.0}})
    with pytest.raises(SpecError, match="No tensor of the calibration table") as bad:
        sweep(tiny_cnn_path, calib, ["int8"], out_dir=tmp_path / "y", table=foreign)
    assert bad.value.field == "table" and not (tmp_path / "y").exists()


def test_sweep_with_automatic_mixed_precision(small_cnn_path: Path, tmp_path: Path) -> None:
    images = zoo.small_images(500)
    with OnnxRuntimeRunner(small_cnn_path) as fp32_runner:
        labels = fp32_runner.run({"image": images})["logits"].argmax(1)
    labels[::5] = (labels[::5] + 1) % 10  # FP32 gets one sample in five wrong
    data = CalibrationDataset.from_arrays({"image": images})
    report = sweep(
        small_cnn_path,
        data,
        ["fp32", "int8", "auto:sqnr_db:32", "auto:accuracy:0.99"],
        out_dir=tmp_path,
        backend=BackendName.ONNXRUNTIME,
        eval_fraction=0.4,
        labels=labels,
        benchmark_options=QUICK,
    )
    assert report.accuracy_metric is AccuracyMetric.ACCURACY
    auto = report.variant("auto:sqnr_db:32")
    int8 = report.variant("int8")
    assert auto.mixed is not None and auto.budget is not None
    assert int8.accuracy.metric(AccuracyMetric.SQNR_DB) < 32  # type: ignore[operator]
    assert auto.kept_nodes and auto.kept_nodes == auto.mixed.kept_nodes
    assert auto.accuracy.passed is True and auto.accuracy.budget_value >= 32  # type: ignore[operator]
    assert 0.0 < auto.int8_share == auto.mixed.int8_share < 1.0  # a real mix
    assert auto.artifact == "auto-sqnr_db-32.onnx" and auto.search_seconds > 0
    # FP32 itself is about 80% accurate: that variant fails, and is reported, without the others.
    assert [v.name for v in report.variants] == ["fp32", "int8", "auto:sqnr_db:32"]
    (failed,) = report.failed
    assert failed.name == "auto:accuracy:0.99" and failed.code == "accuracy_budget_unmet"
    assert "cannot be met" in failed.message and failed.hint
    markdown = (tmp_path / "sweep.md").read_text()
    assert "## auto:sqnr_db:32" in markdown and "- auto:accuracy:0.99: " in markdown
    assert all(f"`{n}`" in markdown for n in auto.kept_nodes)
    _check_files(report, tmp_path)


def test_svg_handles_infinite_accuracy(tiny_cnn_path: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = CalibrationDataset.from_arrays(
        {"image": rng.normal(0, 1, (12, 3, 16, 16)).astype(np.float32)}
    )
    report = sweep(
        tiny_cnn_path,
        data,
        ["fp32"],
        out_dir=tmp_path,
        backend=BackendName.ONNXRUNTIME,
        eval_fraction=0.5,
        accuracy_metric=AccuracyMetric.SQNR_DB,
        benchmark_options=BenchmarkOptions(warmup_ms=0, duration_s=0.05, iterations=3),
    )
    (only,) = report.variants
    assert only.accuracy_value == math.inf and only.pareto and report.table_sha256 is None
    root = ET.fromstring(render_svg(report))
    (point,) = [c for c in root.iter(f"{SVG}circle") if "point" in c.get("class", "")]
    assert "axis edge" in "".join(point.itertext())
    assert SweepReport.model_validate_json((tmp_path / "sweep.json").read_text()) == report

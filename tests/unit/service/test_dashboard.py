"""The dashboard marks builds that failed the accuracy gate, in words, and the report page says
which outputs missed which budget."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
from fastapi.testclient import TestClient
from onnx import helper, numpy_helper

from calibrators.data import CalibrationDataset
from engines.accuracy import compare
from engines.gate import evaluate_gate
from engines.spec import AccuracyGate
from engines.variants import InMemoryRunner
from service.dashboard.render import render_report
from service.dashboard.views import accuracy_chart
from service.db import Database
from tests.unit.service.support import insert_build

GATE_HINT = "Try another calibration method (--method minmax)"


def _row_html(page: str, build_id: str) -> str:
    match = re.search(rf'<tr data-build="{build_id}">(.*?)</tr>', page, re.S)
    assert match is not None, f"no row for {build_id}"
    return match.group(1)


def test_build_list_marks_gated_builds_in_words(client: TestClient, db_url: str) -> None:
    db = Database(db_url)
    with db.session() as session:
        for build_id, code in (("gated", "accuracy_gate_failed"), ("broken", "build_failed")):
            row = insert_build(session, build_id, status="failed")
            row.error_code, row.error_message = code, f"{build_id} message"
            row.error_hint = GATE_HINT if code == "accuracy_gate_failed" else "other hint"
        insert_build(session, "fine", status="succeeded")
        session.commit()
    db.dispose()
    page = client.get("/").text
    gated, broken, fine = (_row_html(page, b) for b in ("gated", "broken", "fine"))
    assert "gated: accuracy gate failed" in gated and "gated message" in gated
    assert GATE_HINT in gated  # what to try, next to the verdict
    assert "accuracy gate" not in broken and "other hint" not in broken
    assert "broken message" in broken
    assert "gated" not in fine and "failed" not in fine


def _accuracy_and_gate(gate: AccuracyGate) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real comparison of ``y = x`` with ``y = x + 0.5`` (SQNR about 6 dB) and its verdict."""

    def model(offset: float) -> onnx.ModelProto:
        nodes = [helper.make_node("Add", ["x", "d"], ["y"], name="add")]
        inits = [numpy_helper.from_array(np.full((1, 8), offset, np.float32), "d")]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32) * 0.7
    with InMemoryRunner(model(0.0), "fp32", 1) as ref, InMemoryRunner(model(0.5), "int8", 1) as c:
        report = compare(ref, c, CalibrationDataset.from_arrays({"x": x}))
    return report.model_dump(mode="json"), evaluate_gate(report, gate).model_dump(mode="json")


def _report(accuracy: dict[str, Any], gate: dict[str, Any] | None) -> dict[str, Any]:
    timing = dict.fromkeys(
        ("min_ms", "median_ms", "mean_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"), 1.0
    )
    return {
        "build_id": "b" * 32,
        "artifact": {"filename": "model.onnx", "size_bytes": 10, "sha256": "a" * 64},
        "artifact_metadata": {"backend": "onnxruntime", "backend_version": "1", "device": "cpu"},
        "spec": {"precision": "int8"},
        "model": {"filename": "m.onnx", "id": "m" * 64},
        "dataset": {"filename": "d.npz", "num_samples": 6},
        "calibration": None,
        "quantized_nodes": [],
        "kept_nodes": {},
        "performance": {
            "throughput_qps": 1.0,
            "batch_size": 1,
            "queries": 1,
            "total_host_walltime_s": 1.0,
            "warnings": [],
            **{k: timing for k in ("latency", "enqueue", "h2d", "gpu_compute", "d2h")},
        },
        "accuracy": accuracy,
        "gate": gate,
        "environment": {},
        "stage_seconds": {},
    }


def test_report_page_names_the_outputs_that_failed_the_gate() -> None:
    accuracy, gate = _accuracy_and_gate(AccuracyGate.parse("sqnr_db:12"))
    html = render_report(_report(accuracy, gate))
    assert "gated: accuracy gate failed" in html and "(sqnr_db &gt;= 12)" in html
    table = re.search(r'<table id="gate-failures">(.*?)</table>', html, re.S)
    assert table is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", table.group(1))
    assert cells[:2] == ["y", "sqnr_db"] and cells[3] == "&gt;= 12.0"
    assert float(cells[2]) < 12
    assert "y <strong>(gate failed)</strong>" in html


def test_report_page_with_a_passed_gate_none_or_no_gate() -> None:
    accuracy, passed = _accuracy_and_gate(AccuracyGate.parse("sqnr_db:1"))
    html = render_report(_report(accuracy, passed))
    assert "Accuracy gate sqnr_db &gt;= 1: passed on every output." in html
    assert "gate failed" not in html
    _, off = _accuracy_and_gate(AccuracyGate.off())
    assert "Accuracy gate: none." in render_report(_report(accuracy, off))
    older = render_report(_report(accuracy, None))  # reports written before the gate existed
    assert "Accuracy gate" not in older and "gate failed" not in older


def test_report_page_shows_what_was_measured_and_why_against_fp32() -> None:
    accuracy, gate = _accuracy_and_gate(AccuracyGate.parse("sqnr_db:1"))
    report = _report(accuracy, gate)
    zero = dict.fromkeys(report["performance"]["latency"], 0.0)
    report["performance"].update(h2d=zero, d2h=zero)  # a host timing's shape, no "timing" field
    report["artifact_metadata"]["options"] = {
        "int8_weight_levels": 63,
        "providers": ["CPUExecutionProvider"],
    }
    html = render_report(report)
    table = re.search(r'<table id="timings">(.*?)</table>', html, re.S)
    assert table is not None
    body = table.group(1).split("</thead>")[1]
    assert re.findall(r"<tr><th>(.*?)</th>", body) == ["host latency"]
    notes = re.search(r'<ul id="fp32-notes">(.*?)</ul>', html, re.S)
    assert notes is not None
    assert "speed not measured" in notes.group(1)
    assert "ONNX Runtime on this CPU has no VNNI INT8 kernels" in notes.group(1)
    assert "ONNX Q/DQ keeps FP32 weights" in notes.group(1)
    device = _report(accuracy, gate)  # a device timing keeps every row, no host notes
    device["performance"]["timing"] = "device"
    device_html = render_report(device)
    device_table = re.search(r'<table id="timings">(.*?)</table>', device_html, re.S)
    assert device_table is not None
    rows = re.findall(r"<tr><th>(.*?)</th>", device_table.group(1).split("</thead>")[1])
    assert rows == ["latency", "enqueue", "h2d", "gpu_compute", "d2h"]
    assert "VNNI" not in device_html


def test_accuracy_chart_draws_the_gate_across_and_marks_failing_outputs_in_words() -> None:
    accuracy, gate = _accuracy_and_gate(AccuracyGate.parse("sqnr_db:12"))
    chart = accuracy_chart(_report(accuracy, gate))
    bars, line = chart["datasets"]
    assert chart["labels"] == [["y", "✗ fails gate"]]  # words under the bar, not colour alone
    assert bars["label"] == "sqnr_db" and bars["failing"] == [True] and bars["data"][0] < 12
    assert line["gateLine"] == 12 and line["label"] == "gate: sqnr_db >= 12"
    assert chart["gate"] == {"value": 12, "higherIsBetter": True}
    accuracy, passed = _accuracy_and_gate(AccuracyGate.parse("max_abs_error:5"))
    chart = accuracy_chart(_report(accuracy, passed))
    assert chart["labels"] == ["y"] and chart["datasets"][0]["failing"] == [False]
    assert chart["datasets"][1]["label"] == "gate: max_abs_error <= 5"
    _, both = _accuracy_and_gate(AccuracyGate.parse(["max_abs_error:5", "sqnr_db:12"]))
    charted_passes = accuracy_chart(_report(accuracy, both))  # fails on the other budget
    assert charted_passes["labels"] == [["y", "✗ fails gate (sqnr_db)"]]
    _, off = _accuracy_and_gate(AccuracyGate.off())
    plain = accuracy_chart(_report(accuracy, off))
    assert "gate" not in plain and plain["datasets"][0]["label"] == "cosine"

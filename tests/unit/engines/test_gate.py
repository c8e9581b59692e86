"""The accuracy gate: parsing, defaults per precision, and its verdict on real comparisons."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from calibrators.data import CalibrationDataset
from engines.accuracy import compare
from engines.accuracy_report import AccuracyMetric, AccuracyReport
from engines.errors import AccuracyGateFailedError, EngineError, SpecError
from engines.gate import (
    DEFAULT_THRESHOLDS,
    GateResult,
    default_gate,
    evaluate_gate,
    gate_error,
    resolve_gate,
)
from engines.spec import AccuracyGate, BuildSpec, Precision
from engines.variants import InMemoryRunner

D = 64


def _model(deltas: dict[str, np.ndarray | None]) -> onnx.ModelProto:
    """Outputs ``y_k = x + delta_k`` (``x`` when ``delta_k`` is None) and ``cls = ArgMax(y_0)``,
    an integer output."""
    nodes, inits, outputs = [], [], []
    for name, delta in deltas.items():
        if delta is None:
            nodes.append(helper.make_node("Identity", ["x"], [name], name=f"{name}_id"))
        else:
            nodes.append(helper.make_node("Add", ["x", f"{name}_d"], [name], name=f"{name}_add"))
            inits.append(numpy_helper.from_array(delta.astype(np.float32), f"{name}_d"))
        outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["n", D]))
    first = next(iter(deltas))
    nodes.append(helper.make_node("ArgMax", [first], ["cls"], axis=1, keepdims=0, name="argmax"))
    outputs.append(helper.make_tensor_value_info("cls", onnx.TensorProto.INT64, ["n"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", D])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _delta_for(x: np.ndarray, sqnr_db: float) -> np.ndarray:
    """A constant offset, the same for every sample, whose output SQNR is ``sqnr_db``."""
    direction = np.random.default_rng(7).normal(size=(1, D))
    direction /= np.linalg.norm(direction)
    power = float(np.square(x.astype(np.float64)).sum()) / len(x)
    return direction * math.sqrt(power / 10 ** (sqnr_db / 10))


def _report(sqnr_db: dict[str, float | None], labels: np.ndarray | None = None) -> AccuracyReport:
    """Compare FP32 (identity outputs) with a candidate whose outputs have these SQNRs."""
    x = np.random.default_rng(0).normal(size=(20, D)).astype(np.float32)
    deltas = {n: None if db is None else _delta_for(x, db) for n, db in sqnr_db.items()}
    reference = _model(dict.fromkeys(sqnr_db))
    with (
        InMemoryRunner(reference, "fp32", 1) as ref,
        InMemoryRunner(_model(deltas), "candidate", 1) as cand,
    ):
        return compare(ref, cand, CalibrationDataset.from_arrays({"x": x}), labels=labels)


def test_parse_budgets_and_none() -> None:
    gate = AccuracyGate.parse(["sqnr_db:12", "top1_agreement:0.95"])
    assert [b.metric for b in gate.budgets] == [
        AccuracyMetric.SQNR_DB,
        AccuracyMetric.TOP1_AGREEMENT,
    ]
    assert gate.enabled and str(gate) == "sqnr_db >= 12, top1_agreement >= 0.95"
    assert AccuracyGate.parse("NONE") == AccuracyGate.off() and str(AccuracyGate.off()) == "none"
    assert not AccuracyGate.parse("none").enabled
    for bad in (["none", "sqnr_db:12"], ["psnr:3"], ["sqnr_db"]):
        with pytest.raises(SpecError) as info:
            AccuracyGate.parse(bad)
        assert info.value.field == "gate"


def test_spec_gate_field_reads_text_and_round_trips() -> None:
    assert BuildSpec().gate is None
    off = BuildSpec.model_validate({"gate": "none"})
    assert off.gate is not None and not off.gate.enabled
    listed = BuildSpec.model_validate({"gate": ["sqnr_db:20", "cosine:0.99"]})
    assert listed.gate == AccuracyGate.parse(["sqnr_db:20", "cosine:0.99"])
    assert BuildSpec.model_validate_json(listed.model_dump_json()) == listed
    assert len({BuildSpec().digest, off.digest, listed.digest}) == 3
    with pytest.raises(ValueError, match="psnr"):
        BuildSpec.model_validate({"gate": "psnr:3"})


def test_defaults_per_precision() -> None:
    int8 = AccuracyGate.parse(DEFAULT_THRESHOLDS["int8"])
    assert default_gate(Precision.INT8) == default_gate(Precision.INT8_FP16) == int8
    assert default_gate(Precision.FP16) == AccuracyGate.parse(DEFAULT_THRESHOLDS["fp16"])
    assert not default_gate(Precision.FP32).enabled
    assert resolve_gate(None, Precision.INT8) == int8
    assert resolve_gate(AccuracyGate.off(), Precision.INT8) == AccuracyGate.off()


@pytest.mark.parametrize(
    ("precision", "sqnr_db", "passes"),
    [
        # issue 9's measurements: collapsed INT8 builds fail, sound ones and FP16 pass
        (Precision.INT8_FP16, 0.4, False),
        (Precision.INT8_FP16, 3.5, False),
        (Precision.INT8, 6.8, False),
        (Precision.INT8, 19.1, True),
        (Precision.INT8_FP16, 37.7, True),
        (Precision.FP16, 37.7, True),
        (Precision.FP16, 6.8, False),
    ],
)
def test_default_gate_separates_measured_builds(
    precision: Precision, sqnr_db: float, passes: bool
) -> None:
    report = _report({"y": sqnr_db})
    assert report.output("y").sqnr_db == pytest.approx(sqnr_db, abs=1e-3)
    result = evaluate_gate(report, default_gate(precision))
    assert result.passed is passes
    assert result.checked_outputs == ["y"]  # the integer output "cls" is not gated


def test_failures_name_each_output_with_value_and_threshold() -> None:
    report = _report({"boxes": 30.0, "scores": 5.0, "mask": 9.0})
    gate = AccuracyGate.parse(["sqnr_db:12", "cosine:0.9"])
    result = evaluate_gate(report, gate)
    assert not result.passed and result.samples == 20
    assert result.checked_outputs == ["boxes", "scores", "mask"]
    assert result.failed_outputs == ["scores", "mask"]
    sqnr = [f for f in result.failures if f.metric is AccuracyMetric.SQNR_DB]
    assert [(f.output, f.threshold) for f in sqnr] == [("scores", 12.0), ("mask", 12.0)]
    assert sqnr[0].value == pytest.approx(5.0, abs=1e-3)
    cosine = [f for f in result.failures if f.metric is AccuracyMetric.COSINE]
    assert [f.output for f in cosine] == ["scores"]  # 5 dB: cosine ~0.85; 9 dB: ~0.94
    assert str(sqnr[0]) == "scores: sqnr_db 5 (needs >= 12)"
    assert GateResult.model_validate_json(result.model_dump_json()) == result


def test_gate_error_names_outputs_and_what_to_try() -> None:
    result = evaluate_gate(_report({"logits": 6.8}), default_gate(Precision.INT8))
    error = gate_error(result, Precision.INT8)
    assert isinstance(error, EngineError) and error.code == "accuracy_gate_failed"
    assert error.failed_outputs == ("logits",) and error.field == "gate"
    assert "'logits'" in error.message and "sqnr_db 6.8" in error.message
    assert "sqnr_db >= 10" in error.message and "20 held-out" in error.message
    for option in ("--method", "--accuracy-budget", "--keep", "--gate none"):
        assert option in error.hint
    fp16_result = evaluate_gate(_report({"logits": 6.8}), default_gate(Precision.FP16))
    fp16 = gate_error(fp16_result, Precision.FP16)
    assert "--keep-fp16" in fp16.hint and "--method" not in fp16.hint
    assert isinstance(AccuracyGateFailedError(), EngineError)
    assert AccuracyGateFailedError().hint  # a default hint for callers that raise it bare


def test_nan_fails_and_an_off_gate_passes() -> None:
    report = _report({"y": 20.0})
    out = report.output("y").model_copy(update={"sqnr_db": math.nan})
    broken = report.model_copy(update={"outputs": [out, *report.outputs[1:]]})
    assert not evaluate_gate(broken, AccuracyGate.parse("sqnr_db:12")).passed
    off = evaluate_gate(broken, AccuracyGate.off())
    assert off.passed and off.failures == [] and off.checked_outputs == []


def test_metrics_no_output_reports_are_spec_errors() -> None:
    report = _report({"y": 20.0})  # y: [N, 64] class scores; no labels
    assert evaluate_gate(report, AccuracyGate.parse("top1_agreement:0.5")).passed
    with pytest.raises(SpecError, match="labels are needed") as info:
        evaluate_gate(report, AccuracyGate.parse("accuracy_drop:0.01"))
    assert info.value.field == "gate"
    labels = np.zeros(20, np.int64)
    labelled = _report({"y": 20.0}, labels=labels)
    assert evaluate_gate(labelled, AccuracyGate.parse("accuracy_drop:1")).passed

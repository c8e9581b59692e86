"""The one build workflow: smoothing and bias correction around calibration, prequantized models,
the accuracy gate, and what the sidecar says about them (tiny in-process models, ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.data import CalibrationDataset
from calibrators.spec import method_spec
from engines import workflow as workflow_module
from engines.accuracy_report import AccuracyMetric, MetricBudget
from engines.spec import AccuracyGate, BuildSpec, KeepRules, TechniqueMode
from engines.workflow import (
    SMOOTHING_JUDGE_SAMPLES,
    SMOOTHING_MIN_GAIN_DB,
    Calibration,
    Workflow,
    _CalibrationRun,
    _judge_fit,
)
from tests.unit.engines.graph.test_prequantized import _modelopt_style_conv
from tests.unit.engines.graph.test_smoothing import _conv_relu_conv, _images


@pytest.fixture
def wide_model(tmp_path: Path) -> Path:
    """Conv -> Relu -> 1x1 Conv where the first conv makes a few wide channels."""
    path = tmp_path / "wide.onnx"
    onnx.save(_conv_relu_conv(), path)
    return path


def _data(count: int = 48) -> CalibrationDataset:
    return CalibrationDataset.from_arrays({"x": _images(count, seed=1)})


def _build(path: Path, spec: BuildSpec, out: Path) -> tuple[Workflow, float]:
    flow = Workflow(path, spec)
    split = flow.split(_data())
    calibration = flow.calibrate(split.calibration)
    assert calibration is not None
    artifact = flow.build(out, calibration.table)
    sqnr = flow.evaluate(artifact, split.evaluation).metric(AccuracyMetric.SQNR_DB)
    assert sqnr is not None
    return flow, sqnr


def test_smoothing_prepares_the_model_calibration_and_build_use(
    wide_model: Path, tmp_path: Path
) -> None:
    spec = BuildSpec(
        precision="int8",
        backend="onnxruntime",
        calibration=method_spec("minmax"),
        smoothing=TechniqueMode.ON,
        bias_correction=TechniqueMode.OFF,
    )
    with Workflow(wide_model, spec) as flow:
        split = flow.split(_data())
        calibration = flow.calibrate(split.calibration)
        assert calibration is not None and calibration.smoothing is not None
        assert calibration.smoothing.applied, calibration.smoothing
        assert flow.int8_model_path != wide_model and flow.int8_model_path.exists()
        artifact = flow.build(tmp_path / "smoothed.onnx", calibration.table)
        meta = artifact.metadata
        assert meta.preparation["smoothing"]["smoothed"]
        assert meta.model_sha256 == flow.model_sha256  # the user's model, not the copy
        prepared = flow.int8_model_path
    assert not prepared.exists()  # the scratch folder goes with the workflow
    plain_flow, plain = _build(
        wide_model,
        spec.model_copy(update={"smoothing": TechniqueMode.OFF}),
        tmp_path / "plain.onnx",
    )
    smoothed_flow, smoothed = _build(wide_model, spec, tmp_path / "smoothed2.onnx")
    plain_flow.close()
    smoothed_flow.close()
    assert smoothed > plain + 1.0  # the wide channels no longer eat the activation's levels


def _auto_smoothing_flow(path: Path, **updates: object) -> tuple[Workflow, object]:
    fields: dict[str, object] = {
        "precision": "int8",
        "backend": "onnxruntime",
        "calibration": method_spec("minmax"),
        "smoothing": TechniqueMode.AUTO,
        "bias_correction": TechniqueMode.OFF,
    }
    flow = Workflow(path, BuildSpec.model_validate({**fields, **updates}))
    split = flow.split(_data())
    return flow, flow.calibrate(split.calibration, held_out=split.evaluation)


def test_auto_smoothing_is_kept_where_the_whole_int8_model_gains(wide_model: Path) -> None:
    flow, calibration = _auto_smoothing_flow(wide_model)
    with flow:
        assert isinstance(calibration, Calibration) and calibration.smoothing is not None
        judged = calibration.smoothing.judged
        assert judged is not None and judged.kept, judged
        assert judged.sqnr_smoothed_db >= judged.sqnr_plain_db + SMOOTHING_MIN_GAIN_DB
        assert judged.held_out and judged.samples == 10  # the held-out split of 48 samples
        assert calibration.smoothing.applied and flow.int8_model_path != wide_model
        assert flow.preparation["smoothing"]["judged"]["kept"] is True


def test_without_held_out_samples_auto_smoothing_is_judged_on_calibration_samples(
    wide_model: Path,
) -> None:
    spec = BuildSpec(
        precision="int8",
        backend="onnxruntime",
        calibration=method_spec("minmax"),
        bias_correction=TechniqueMode.OFF,
    )
    with Workflow(wide_model, spec) as flow:
        many = CalibrationDataset.from_arrays({"x": _images(SMOOTHING_JUDGE_SAMPLES + 8, seed=2)})
        calibration = flow.calibrate(many)
        assert calibration is not None and calibration.smoothing is not None
        judged = calibration.smoothing.judged
        assert judged is not None and not judged.held_out
        assert judged.samples == SMOOTHING_JUDGE_SAMPLES  # spread over the 136


def test_the_judge_takes_no_more_samples_than_half_the_memory_limit_holds() -> None:
    data = CalibrationDataset.from_arrays({"x": _images(100, seed=3)})  # 768 bytes a sample
    assert _judge_fit(data, _CalibrationRun(data, None, None, None, 2 * 768 * 40)) == 40
    assert _judge_fit(data, _CalibrationRun(data, None, None, None, 1000)) == 16  # the floor
    assert _judge_fit(data, _CalibrationRun(data, None, None, None, None)) > 100  # 1 GiB default


def test_auto_smoothing_is_dropped_where_the_whole_int8_model_does_not_gain_enough(
    wide_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the same model, with a bar it cannot clear: the plain model and its own table are used
    monkeypatch.setattr(workflow_module, "SMOOTHING_MIN_GAIN_DB", 1000.0)
    flow, calibration = _auto_smoothing_flow(wide_model)
    with flow:
        assert isinstance(calibration, Calibration) and calibration.smoothing is not None
        judged = calibration.smoothing.judged
        assert judged is not None and not judged.kept and judged.min_gain_db == 1000.0
        assert not calibration.smoothing.applied
        reasons = {t.reason for t in calibration.smoothing.tensors}
        assert "the whole INT8 model measured no better with smoothing" in reasons
        assert flow.int8_model_path == wide_model
        plain_flow, plain = _auto_smoothing_flow(wide_model, smoothing=TechniqueMode.OFF)
        with plain_flow:
            assert isinstance(plain, Calibration)
            assert calibration.table.amax == plain.table.amax  # the plain model's table
        artifact = flow.build(tmp_path / "m.onnx", calibration.table)
        recorded = artifact.metadata.preparation["smoothing"]
        assert recorded["smoothed"] == [] and recorded["judged"]["kept"] is False


def test_the_backend_is_chosen_once_through_judge_budget_search_and_build(
    wide_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engines.backends import registry

    chosen = []
    real = registry.select_backend

    def counting(name: object) -> object:
        chosen.append(name)
        return real(name)  # type: ignore[arg-type]

    monkeypatch.setattr(registry, "select_backend", counting)
    monkeypatch.setattr(workflow_module, "select_backend", counting)
    spec = BuildSpec(precision="int8", backend="onnxruntime", calibration=method_spec("minmax"))
    with Workflow(wide_model, spec) as flow:
        split = flow.split(_data())
        calibration = flow.calibrate(split.calibration, held_out=split.evaluation)
        assert calibration is not None and calibration.smoothing is not None
        assert calibration.smoothing.judged is not None  # the judge ran
        flow.search_budget(calibration.table, split.evaluation, MetricBudget.parse("sqnr_db:5"))
        flow.build(tmp_path / "m.onnx", calibration.table)
    assert chosen == ["onnxruntime"]


def test_off_leaves_the_model_alone(wide_model: Path, tmp_path: Path) -> None:
    spec = BuildSpec(
        precision="int8",
        backend="onnxruntime",
        smoothing=TechniqueMode.OFF,
        bias_correction=TechniqueMode.OFF,
    )
    flow, _ = _build(wide_model, spec, tmp_path / "m.onnx")
    assert flow.int8_model_path == wide_model and flow.preparation == {}
    assert flow.bias_correction is None


def test_bias_correction_runs_per_build_and_respects_its_keep_rules(
    wide_model: Path, tmp_path: Path
) -> None:
    spec = BuildSpec(
        precision="int8",
        backend="onnxruntime",
        smoothing=TechniqueMode.OFF,
        bias_correction=TechniqueMode.ON,
    )
    with Workflow(wide_model, spec) as flow:
        split = flow.split(_data())
        calibration = flow.calibrate(split.calibration)
        assert calibration is not None
        flow.build(tmp_path / "all.onnx", calibration.table)
        assert flow.bias_correction is not None
        assert set(flow.bias_correction.corrected) == {"conv1", "conv2"}
        kept = spec.model_copy(update={"keep": KeepRules(int8=("conv2",))})
        artifact = flow.build(tmp_path / "kept.onnx", calibration.table, spec=kept)
        assert flow.bias_correction.corrected == ["conv1"]  # a kept layer keeps its bias
        assert artifact.metadata.preparation["bias_correction"]["corrected"] == ["conv1"]


def test_a_prequantized_model_builds_without_data_or_table(tmp_path: Path) -> None:
    path = tmp_path / "qat.onnx"
    onnx.save(_modelopt_style_conv(), path)
    flow = Workflow(path, BuildSpec(precision="int8", backend="onnxruntime"))
    assert flow.prequantized
    assert flow.calibrate(None) is None  # nothing to calibrate: the model's scales are kept
    artifact = flow.build(tmp_path / "qat.int8.onnx", None)
    assert artifact.metadata.preparation == {"prequantized": "scales from the model"}
    samples = CalibrationDataset.from_arrays(
        {"x": np.random.default_rng(0).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}
    )
    report = flow.evaluate(artifact, samples)
    assert report.outputs[0].cosine_similarity > 0.999  # built as it is: same Q/DQ, same outputs


def test_the_gate_uses_the_spec_or_the_precision_default(wide_model: Path, tmp_path: Path) -> None:
    spec = BuildSpec(precision="int8", backend="onnxruntime")
    flow = Workflow(wide_model, spec)
    split = flow.split(_data())
    calibration = flow.calibrate(split.calibration)
    assert calibration is not None
    artifact = flow.build(tmp_path / "m.onnx", calibration.table)
    accuracy = flow.evaluate(artifact, split.evaluation)
    default = flow.gate(accuracy)
    assert default.gate_text == "sqnr_db >= 10"
    assert default.passed == ((accuracy.metric(AccuracyMetric.SQNR_DB) or 0) >= 10)
    strict = flow.gate(
        accuracy, spec=spec.model_copy(update={"gate": AccuracyGate.parse("sqnr_db:300")})
    )
    assert not strict.passed and strict.failed_outputs == ["y"]
    flow.close()

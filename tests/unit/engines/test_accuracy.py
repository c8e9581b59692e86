"""Accuracy metrics against the FP32 reference, on real models with known differences."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calibrators.data import CalibrationDataset
from engines.accuracy import compare
from engines.accuracy_report import AccuracyMetric, AccuracyReport, MetricBudget, Tolerance
from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.errors import RunError, SpecError
from engines.variants import InMemoryRunner
from tests import zoo

SHIFT = np.array([0.5, -0.25, 0.0, 1.0, 0.125, -0.5, 0.0, 0.0, 0.75, -1.0], dtype=np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny_cnn, and a copy whose final bias is shifted by SHIFT (so logits shift by SHIFT)."""
    folder = tmp_path_factory.mktemp("accuracy")
    model = zoo.tiny_cnn()
    ref_path = folder / "ref.onnx"
    onnx.save(model, ref_path)
    for init in model.graph.initializer:
        if init.name == "fc.b":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + SHIFT, "fc.b"))
    shifted_path = folder / "shifted.onnx"
    onnx.save(model, shifted_path)
    return ref_path, shifted_path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(37, 3, 16, 16)).astype(np.float32)


def _reference_logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": images})[0], dtype=np.float64)


def test_model_against_itself_is_perfect(models: tuple[Path, Path], images: np.ndarray) -> None:
    ref_path, _ = models
    data = CalibrationDataset.from_arrays({"image": images})
    with OnnxRuntimeRunner(ref_path) as ref, OnnxRuntimeRunner(ref_path) as cand:
        report = compare(ref, cand, data, batch_size=8, tolerances=Tolerance(atol=0, rtol=0))
    out = report.output("logits")
    assert report.samples == out.samples == 37
    assert out.sample_shape == [10]
    assert out.elements == 370
    assert out.max_abs_error == out.mean_abs_error == out.max_rel_error == 0.0
    assert out.rel_l2_error == 0.0
    assert out.cosine_similarity == pytest.approx(1.0, abs=1e-12)
    assert out.min_cosine_similarity == pytest.approx(1.0, abs=1e-12)
    assert out.sqnr_db == math.inf
    assert out.classifier and out.top1_agreement == 1.0 and out.top5_agreement == 1.0
    assert out.passed is True and report.passed is True and report.failures == []
    assert report.reference["backend"] == "onnxruntime"
    again = AccuracyReport.model_validate_json(report.model_dump_json())
    assert again == report  # infinity survives JSON


def test_known_bias_shift_gives_known_errors(models: tuple[Path, Path], images: np.ndarray) -> None:
    ref_path, shifted_path = models
    r = _reference_logits(ref_path, images)
    c = _reference_logits(shifted_path, images)
    assert np.allclose(c - r, SHIFT, atol=1e-5)  # the perturbation is what we think it is
    data = CalibrationDataset.from_arrays({"image": images})
    with OnnxRuntimeRunner(ref_path) as ref, OnnxRuntimeRunner(shifted_path) as cand:
        report = compare(
            ref, cand, data, batch_size=5, tolerances={"logits": Tolerance(atol=0.2, rtol=0.0)}
        )
    out = report.output("logits")
    n = len(images)
    assert out.max_abs_error == pytest.approx(1.0, abs=1e-5)
    assert out.mean_abs_error == pytest.approx(float(np.abs(SHIFT).mean()), abs=1e-5)
    assert out.rel_l2_error == pytest.approx(
        math.sqrt(n * float(np.square(SHIFT).sum())) / float(np.linalg.norm(r)), rel=1e-4
    )
    expected_sqnr = 10 * math.log10(float(np.square(r).sum()) / (n * float(np.square(SHIFT).sum())))
    assert out.sqnr_db == pytest.approx(expected_sqnr, abs=1e-3)
    whole = float((r * c).sum() / (np.linalg.norm(r) * np.linalg.norm(c)))
    assert out.cosine_similarity == pytest.approx(whole, abs=1e-9)
    cos = (r * c).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1))
    assert out.min_cosine_similarity == pytest.approx(float(cos.min()), abs=1e-9)
    assert out.negligible_reference_samples == 0
    rel = np.abs(c - r) / np.maximum(np.abs(r), 1e-12)
    assert out.max_rel_error == pytest.approx(float(rel.max()), rel=1e-3)
    agree = float((r.argmax(1) == c.argmax(1)).mean())
    assert out.top1_agreement == pytest.approx(agree)
    top5 = np.argsort(-c, axis=1)[:, :5]
    assert out.top5_agreement == pytest.approx(float((top5 == r.argmax(1)[:, None]).any(1).mean()))
    # |SHIFT| > 0.2 in 6 of 10 columns, for every sample.
    assert out.tolerance_violations == 6 * n
    assert out.passed is False and report.passed is False
    assert f"{6 * n} of {10 * n}" in report.failures[0] and "logits" in report.failures[0]


def test_statistics_do_not_depend_on_batching(
    models: tuple[Path, Path], images: np.ndarray
) -> None:
    data = CalibrationDataset.from_arrays({"image": images})
    with OnnxRuntimeRunner(models[0]) as ref, OnnxRuntimeRunner(models[1]) as cand:
        one = compare(ref, cand, data, batch_size=1).output("logits")
        big = compare(ref, cand, data, batch_size=64).output("logits")
    for field in (
        "max_abs_error",
        "mean_abs_error",
        "rel_l2_error",
        "cosine_similarity",
        "min_cosine_similarity",
        "sqnr_db",
        "top1_agreement",
    ):
        assert getattr(one, field) == pytest.approx(getattr(big, field), rel=1e-5), field


def test_budget_pass_and_fail(models: tuple[Path, Path], images: np.ndarray) -> None:
    data = CalibrationDataset.from_arrays({"image": images})
    with OnnxRuntimeRunner(models[0]) as ref, OnnxRuntimeRunner(models[1]) as cand:
        loose = compare(ref, cand, data, budget=MetricBudget.parse("max_abs_error:1.5"))
        strict = compare(ref, cand, data, budget=MetricBudget.parse("sqnr_db:200"))
        limited = compare(ref, cand, data, max_samples=10)
    assert loose.passed is True and loose.budget_value == pytest.approx(1.0, abs=1e-5)
    assert strict.passed is False and "sqnr_db >= 200" in strict.failures[0]
    assert limited.samples == 10 and limited.passed is None


def test_metric_budget_parse_and_direction() -> None:
    cosine = MetricBudget.parse("cosine:0.999")
    assert cosine.metric is AccuracyMetric.COSINE and cosine.value == 0.999
    assert cosine.met_by(0.9995) and not cosine.met_by(0.99) and not cosine.met_by(math.nan)
    drop = MetricBudget.parse("accuracy_drop:0.005")
    assert drop.met_by(0.001) and not drop.met_by(0.01)
    assert str(drop) == "accuracy_drop <= 0.005"
    for bad in ("cosine", "psnr:3", "cosine:abc", "top1_agreement:inf"):
        with pytest.raises(SpecError) as info:
            MetricBudget.parse(bad)
        assert info.value.field == "budget"


def test_budget_metric_the_outputs_lack(models: tuple[Path, Path], images: np.ndarray) -> None:
    data = CalibrationDataset.from_arrays({"image": images})
    with OnnxRuntimeRunner(models[0]) as ref, pytest.raises(SpecError, match="labels are needed"):
        compare(ref, ref, data, budget=MetricBudget.parse("accuracy_drop:0.01"))


def test_labels_are_checked(models: tuple[Path, Path], images: np.ndarray) -> None:
    data = CalibrationDataset.from_arrays({"image": images})
    with OnnxRuntimeRunner(models[0]) as ref:
        with pytest.raises(SpecError, match="37 samples"):
            compare(ref, ref, data, labels=np.zeros(5, np.int64))
        with pytest.raises(SpecError, match="integer array"):
            compare(ref, ref, data, labels=np.zeros(37, np.float32))


def test_mismatched_outputs_are_refused(models: tuple[Path, Path], tmp_path: Path) -> None:
    other = tmp_path / "two.onnx"
    onnx.save(zoo.tiny_two_input(), other)
    data = CalibrationDataset.from_arrays({"image": np.zeros((2, 3, 16, 16), np.float32)})
    with (
        OnnxRuntimeRunner(models[0]) as ref,
        OnnxRuntimeRunner(other) as cand,
        pytest.raises(RunError, match="no output"),
    ):
        compare(ref, cand, data)


def _model(shape: list[int | str], delta: np.ndarray | None = None) -> onnx.ModelProto:
    """``y = x`` (the reference) or ``y = x + delta`` (a candidate with a known error)."""
    helper = onnx.helper
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    inits = []
    if delta is not None:
        nodes = [helper.make_node("Add", ["x", "delta"], ["y"], name="add")]
        inits = [numpy_helper.from_array(delta.astype(np.float32), "delta")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _compare_arrays(
    x: np.ndarray, delta: np.ndarray, **options: Any
) -> tuple[AccuracyReport, np.ndarray, np.ndarray]:
    """Compare ``x + delta`` with ``x``: (report, reference, candidate as ONNX Runtime gives it)."""
    shape: list[int | str] = ["n", *x.shape[1:]]
    data = CalibrationDataset.from_arrays({"x": x})
    with (
        InMemoryRunner(_model(shape), "reference", 1) as ref,
        InMemoryRunner(_model(shape, delta), "candidate", 1) as cand,
    ):
        report = compare(ref, cand, data, batch_size=3, **options)
        c = cand.run({"x": x})["y"].astype(np.float64)
    return report, x.astype(np.float64), c


def test_cosine_is_of_the_whole_output_and_skips_negligible_samples() -> None:
    """A detector-like output: some samples are all zeros or nearly (1e-6) in the reference; the
    candidate adds a tiny offset everywhere. Their per-sample cosines are noise, the output's
    cosine stays ~1, the minimum is taken over the others."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 32)).astype(np.float32)
    x[[1, 4, 7]] = 0.0
    x[8] *= 1e-6  # 120 dB below the mean sample: negligible
    x[9] *= 3e-3  # 50 dB below: still counted
    delta = np.full((1, 32), 1e-4, np.float32)
    report, r, c = _compare_arrays(x, delta)
    out = report.output("y")
    whole = float((r * c).sum() / (np.linalg.norm(r) * np.linalg.norm(c)))
    assert out.cosine_similarity == pytest.approx(whole, abs=1e-12)
    assert out.cosine_similarity > 0.9999
    with np.errstate(invalid="ignore"):  # 0 / 0 for the all-zero samples, left out below
        per_sample = (r * c).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1))
    assert per_sample[8] < 0.5  # the negligible sample's direction is the offset's
    counted = [0, 2, 3, 5, 6, 9]
    assert out.min_cosine_similarity == pytest.approx(float(per_sample[counted].min()), abs=1e-12)
    assert out.min_cosine_similarity == pytest.approx(float(per_sample[9]), abs=1e-12)
    assert out.negligible_reference_samples == 4
    assert out.sqnr_db == pytest.approx(
        10 * math.log10(float((r**2).sum()) / float(((c - r) ** 2).sum())), abs=1e-9
    )
    assert report.metric(AccuracyMetric.COSINE) == out.cosine_similarity
    assert report.metric(AccuracyMetric.MIN_COSINE) == out.min_cosine_similarity


def test_min_cosine_is_nan_when_a_counted_sample_is() -> None:
    x = np.random.default_rng(4).normal(size=(4, 8)).astype(np.float32)
    delta = np.zeros((1, 8), np.float32)
    delta[0, 3] = np.nan
    out = _compare_arrays(x, delta)[0].output("y")
    assert math.isnan(out.min_cosine_similarity) and math.isnan(out.cosine_similarity)
    assert out.nonfinite_values == 4


def test_cosine_of_all_zero_outputs() -> None:
    x = np.zeros((4, 8), np.float32)
    same = _compare_arrays(x, np.zeros((1, 8), np.float32))[0].output("y")
    assert same.cosine_similarity == same.min_cosine_similarity == 1.0
    assert same.negligible_reference_samples == 4 and same.sqnr_db == math.inf
    off = _compare_arrays(x, np.full((1, 8), 0.5, np.float32))[0].output("y")
    assert off.cosine_similarity == off.min_cosine_similarity == 0.0
    assert off.sqnr_db == -math.inf


def _agreement(r: np.ndarray, c: np.ndarray, axis: int) -> tuple[float, float]:
    """(top-1, top-5) agreement over ``axis``, counted per position, written out with argsort."""
    r2 = np.moveaxis(r, axis, -1).reshape(-1, r.shape[axis])
    c2 = np.moveaxis(c, axis, -1).reshape(-1, c.shape[axis])
    ref_top = r2.argmax(1)
    top5 = np.argsort(-c2, axis=1)[:, :5]
    return float((ref_top == c2.argmax(1)).mean()), float((top5 == ref_top[:, None]).any(1).mean())


def test_sequence_outputs_report_agreement_per_time_step() -> None:
    """[N, T, C] (a CTC recognizer's softmax): agreement over the last axis, per time step;
    per-position labels with padding; a top1_agreement budget works."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(7, 12, 9)).astype(np.float32)
    shift = (rng.normal(size=9) * 0.8).astype(np.float32)
    labels = rng.integers(0, 9, size=(7, 12))
    labels[:, -3:] = -100  # padding is not scored
    report, r, c = _compare_arrays(
        x, shift, labels=labels, budget=MetricBudget.parse("top1_agreement:0.5")
    )
    out = report.output("y")
    top1, top5 = _agreement(r, c, 2)
    assert 0.3 < top1 < 0.95  # the shift flips some predictions, not all
    assert out.classifier and out.class_axis == 2 and out.class_positions == 7 * 12
    assert out.top1_agreement == pytest.approx(top1) and out.top5_agreement == pytest.approx(top5)
    valid = labels >= 0
    ref_acc = float((r.argmax(2) == labels)[valid].mean())
    cand_acc = float((c.argmax(2) == labels)[valid].mean())
    assert out.labelled_positions == int(valid.sum()) == 7 * 9
    assert out.reference_accuracy == pytest.approx(ref_acc)
    assert out.candidate_accuracy == pytest.approx(cand_acc)
    assert out.accuracy_drop == pytest.approx(ref_acc - cand_acc)
    assert report.budget_value == pytest.approx(top1) and report.passed is (top1 >= 0.5)


def test_channels_last_maps_are_detected_and_channels_first_need_class_axis() -> None:
    rng = np.random.default_rng(3)
    nhwc = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
    shift = np.array([0.3, -0.2, 0.1], np.float32)
    report, r, c = _compare_arrays(nhwc, shift)
    out = report.output("y")
    assert out.class_axis == 3 and out.class_positions == 4 * 5 * 6
    assert out.top1_agreement == pytest.approx(_agreement(r, c, 3)[0])
    assert out.top5_agreement is None  # three classes

    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    chw_shift = shift.reshape(3, 1, 1)
    plain = _compare_arrays(nchw, chw_shift)[0].output("y")
    assert not plain.classifier and plain.top1_agreement is None
    labels = rng.integers(0, 3, size=(4, 5, 6))
    named, r, c = _compare_arrays(nchw, chw_shift, class_axis={"y": 1}, labels=labels)
    out = named.output("y")
    assert out.class_axis == 1 and out.top1_agreement == pytest.approx(_agreement(r, c, 1)[0])
    assert out.top1_agreement == report.output("y").top1_agreement  # same predictions
    assert out.reference_accuracy == pytest.approx(float((r.argmax(1) == labels).mean()))


def test_class_axis_and_label_shapes_are_checked() -> None:
    x = np.zeros((2, 3, 4, 5), np.float32)
    delta = np.zeros((1,), np.float32)
    for bad in (0, 4, -5):
        with pytest.raises(SpecError, match="no class axis") as info:
            _compare_arrays(x, delta, class_axis=bad)
        assert info.value.field == "class_axis"
    with pytest.raises(SpecError, match="does not have"):
        _compare_arrays(x, delta, class_axis={"logits": 1})
    assert _compare_arrays(x, delta, class_axis=-3)[0].output("y").class_axis == 1
    with pytest.raises(SpecError, match="no output holds class scores"):
        _compare_arrays(x, delta, labels=np.zeros(2, np.int64))
    seq = np.zeros((2, 6, 4), np.float32)
    with pytest.raises(SpecError, match=r"fit no class-score output \(expected y: \[N, 6\]\)"):
        _compare_arrays(seq, delta, labels=np.zeros(2, np.int64))


def test_budget_on_a_metric_no_output_reports_names_the_class_axis() -> None:
    x = np.zeros((2, 3, 4, 5), np.float32)
    with pytest.raises(SpecError, match="top1_agreement") as info:
        _compare_arrays(x, np.zeros(1, np.float32), budget=MetricBudget.parse("top1_agreement:0.9"))
    assert info.value.hint is not None and "class_axis" in info.value.hint


@pytest.mark.slow
def test_fashion_cnn_true_accuracy_through_compare() -> None:
    path = zoo.fashion_cnn()
    images, labels = zoo.fashion_mnist("test")
    images, labels = images[:2000], labels[:2000]
    data = CalibrationDataset.from_arrays({"image": images})
    with OnnxRuntimeRunner(path) as ref, OnnxRuntimeRunner(path) as cand:
        report = compare(
            ref,
            cand,
            data,
            batch_size=256,
            labels=labels,
            budget=MetricBudget.parse("accuracy_drop:0.005"),
        )
    out = report.output("logits")
    direct = _reference_logits(path, images).argmax(1)
    assert out.reference_accuracy == pytest.approx(float((direct == labels).mean()))
    assert out.reference_accuracy is not None and out.reference_accuracy > 0.8
    assert out.candidate_accuracy == out.reference_accuracy
    assert out.accuracy_drop == 0.0
    assert report.passed is True and report.budget_value == 0.0


@pytest.mark.slow
def test_fashion_cnn_int8_build_keeps_labelled_accuracy(tmp_path: Path) -> None:
    """End to end: calibrate (entropy) on train images, build INT8, compare on test images."""
    from calibrators.calibrate import calibrate
    from calibrators.spec import entropy
    from engines.build import build_artifact
    from engines.spec import BuildSpec, Precision

    path = zoo.fashion_cnn()
    train, _ = zoo.fashion_mnist("train")
    images, labels = zoo.fashion_mnist("test")
    table = calibrate(path, CalibrationDataset.from_arrays({"image": train[-512:]}), entropy())
    out = tmp_path / "int8.onnx"
    build_artifact(path, BuildSpec(precision=Precision.INT8, backend="onnxruntime"), table, out)
    data = CalibrationDataset.from_arrays({"image": images[:2000]})
    budget = MetricBudget.parse("accuracy_drop:0.005")
    with OnnxRuntimeRunner(path) as ref, OnnxRuntimeRunner(out) as cand:
        report = compare(ref, cand, data, batch_size=250, labels=labels[:2000], budget=budget)
    out_acc = report.output("logits")
    assert out_acc.top1_agreement is not None and out_acc.top1_agreement > 0.98
    assert out_acc.sqnr_db > 25
    assert out_acc.accuracy_drop is not None and out_acc.accuracy_drop <= 0.005
    assert report.passed is True

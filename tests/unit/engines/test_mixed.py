"""Per-node sensitivity and the accuracy-budget search, on real models (tiny CNN, Fashion-MNIST)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.methods import entropy
from calibrators.table import CalibrationTable
from engines.accuracy import AccuracyMetric, MetricBudget, compare
from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.build import build_artifact
from engines.errors import AccuracyBudgetError, SpecError
from engines.graph import prepare_model
from engines.mixed import (
    MemoizedRunner,
    MixedPrecisionResult,
    node_sensitivity,
    ranking_metric,
    search_mixed_precision,
)
from engines.spec import BackendName, BuildSpec, KeepRules, Precision
from tests import zoo

INT8 = BuildSpec(precision=Precision.INT8, backend=BackendName.ONNXRUNTIME)


@pytest.fixture(scope="module")
def fashion() -> tuple[Path, CalibrationDataset, CalibrationDataset, np.ndarray, CalibrationTable]:
    """The trained Fashion-MNIST CNN, 512 calibration and 300 held-out test images, a table."""
    path = zoo.fashion_cnn()
    images, labels = zoo.fashion_mnist("test")
    calibration = CalibrationDataset.from_arrays({"image": images[:512]})
    held_out = CalibrationDataset.from_arrays({"image": images[512:812]})
    table = calibrate(path, calibration, entropy())
    return path, calibration, held_out, labels[512:812], table


def _quantized_activations(model: onnx.ModelProto, node: str) -> list[str]:
    """Activation tensors whose Q/DQ pair feeds ``node`` in a Q/DQ model."""
    producer = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name for t in model.graph.initializer}
    target = next(n for n in model.graph.node if n.name == node)
    found = []
    for tensor in target.input:
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer[dq.input[0]]
        if q.input[0] not in inits:
            found.append(q.input[0])
    return found


def _damaged(
    path: Path, table: CalibrationTable, nodes: list[str], factor: float = 8.0
) -> CalibrationTable:
    """``table`` with the ranges of the activations feeding ``nodes`` shrunk ``factor`` times."""
    qdq = prepare_model(onnx.load(str(path)), INT8, table).model
    names = {t for node in nodes for t in _quantized_activations(qdq, node)}
    assert names, f"no quantized activations feed {nodes}"
    amax = {k: v / factor if k in names else v for k, v in table.amax.items()}
    return table.model_copy(update={"amax": amax})


def _accuracy_of_artifact(
    path: Path,
    spec: BuildSpec,
    table: CalibrationTable,
    held_out: CalibrationDataset,
    labels: np.ndarray,
    budget: MetricBudget,
    out: Path,
) -> float | None:
    artifact = build_artifact(path, spec, table, out)
    with OnnxRuntimeRunner(path) as ref, OnnxRuntimeRunner(artifact.path) as cand:
        report = compare(ref, cand, held_out, labels=labels, budget=budget)
    assert report.passed is not None
    return report.budget_value if report.passed else None


def test_ranking_metric_replaces_class_counts_with_sqnr() -> None:
    assert ranking_metric(AccuracyMetric.TOP1_AGREEMENT) is AccuracyMetric.SQNR_DB
    assert ranking_metric(AccuracyMetric.ACCURACY_DROP) is AccuracyMetric.SQNR_DB
    assert ranking_metric(AccuracyMetric.COSINE) is AccuracyMetric.COSINE
    assert ranking_metric(AccuracyMetric.MAX_ABS_ERROR) is AccuracyMetric.MAX_ABS_ERROR


def test_damaged_nodes_rank_first_in_sensitivity(fashion) -> None:  # type: ignore[no-untyped-def]
    path, _, held_out, _, table = fashion
    bad = _damaged(path, table, ["/3/Conv", "/9/Gemm"])
    report = node_sensitivity(path, bad, INT8, held_out, samples=64)
    assert report.metric is AccuracyMetric.SQNR_DB
    assert report.quantizable_nodes == len(report.nodes) == 4
    assert report.evaluated_nodes == 4
    assert report.evaluations == 8  # only-this and all-but-this per node
    assert [n.rank for n in report.nodes] == [1, 2, 3, 4]
    assert set(report.ranked_nodes[:2]) == {"/3/Conv", "/9/Gemm"}
    by_name = {n.node: n for n in report.nodes}
    assert by_name["/3/Conv"].op_type == "Conv" and by_name["/9/Gemm"].op_type == "Gemm"
    healthy = [by_name[n] for n in ("/0/Conv", "/7/Gemm")]
    damaged = [by_name[n] for n in ("/3/Conv", "/9/Gemm")]
    # Quantizing a damaged node alone costs far more SQNR than quantizing a healthy one alone,
    # and the cheap proxy sees it too.
    worst_healthy = min(n.metric_only_this for n in healthy)  # type: ignore[type-var]
    assert all(n.metric_only_this < worst_healthy - 6 for n in damaged)  # type: ignore[operator]
    assert max(n.proxy_sqnr_db for n in damaged) < min(n.proxy_sqnr_db for n in healthy)
    # Keeping a damaged node out of INT8 (all but this) helps more than keeping a healthy one.
    assert min(n.metric_all_but_this for n in damaged) > max(  # type: ignore[type-var]
        n.metric_all_but_this for n in healthy  # type: ignore[misc]
    )


def test_max_nodes_evaluates_the_proxy_worst_first(fashion) -> None:  # type: ignore[no-untyped-def]
    path, _, held_out, _, table = fashion
    bad = _damaged(path, table, ["/7/Gemm"])
    report = node_sensitivity(
        path, bad, INT8, held_out, samples=32, max_nodes=1, all_but_this=False
    )
    assert report.evaluated_nodes == 1 and report.evaluations == 1
    first, *rest = report.nodes
    assert first.node == "/7/Gemm"
    assert first.metric_only_this is not None and first.metric_all_but_this is None
    assert all(n.metric_only_this is None and n.metric_all_but_this is None for n in rest)
    # The unevaluated nodes follow in proxy order (worst local SQNR first).
    proxies = [n.proxy_sqnr_db for n in rest]
    assert proxies == sorted(proxies)


@pytest.mark.slow
def test_budget_search_keeps_exactly_the_damaged_nodes(fashion, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _, held_out, labels, table = fashion
    bad = _damaged(path, table, ["/3/Conv", "/9/Gemm"])
    budget = MetricBudget.parse("top1_agreement:0.97")
    result = search_mixed_precision(path, bad, INT8, held_out, budget, labels=labels)
    assert isinstance(result, MixedPrecisionResult)
    assert result.value_full_int8 < 0.97  # full INT8 with the damaged table misses
    assert result.sensitivity is not None
    assert set(result.kept_nodes) == {"/3/Conv", "/9/Gemm"}
    assert result.kept_nodes == result.sensitivity.ranked_nodes[:2]
    assert result.quantizable_nodes == 4 and result.int8_nodes == 2
    assert result.int8_share == pytest.approx(0.5)
    assert result.value_reached >= 0.97
    assert result.accuracy.passed is True and result.accuracy.samples == 300
    assert result.evaluations == 1 + result.sensitivity.evaluations + 2  # full, ranking, bisection
    # Built as a real artifact with the kept nodes, the model meets the budget on re-evaluation.
    spec = result.apply_to(INT8)
    assert spec.keep.int8 == tuple(result.kept_nodes)
    reached = _accuracy_of_artifact(
        path, spec, bad, held_out, labels, budget, tmp_path / "mixed.onnx"
    )
    assert reached is not None and reached == pytest.approx(result.value_reached, abs=0.01)
    # ...which full INT8 with the same table does not.
    assert (
        _accuracy_of_artifact(path, INT8, bad, held_out, labels, budget, tmp_path / "int8.onnx")
        is None
    )


def test_met_budget_keeps_nothing(fashion) -> None:  # type: ignore[no-untyped-def]
    path, _, held_out, labels, table = fashion
    result = search_mixed_precision(
        path, table, INT8, held_out, "accuracy_drop:0.02", labels=labels
    )
    assert result.kept_nodes == [] and result.sensitivity is None
    assert result.evaluations == 1
    assert result.int8_share == 1.0 and result.int8_nodes == result.quantizable_nodes == 4
    assert result.value_reached == result.value_full_int8 <= 0.02
    assert result.accuracy.output("logits").reference_accuracy is not None


def test_impossible_budget_raises(fashion) -> None:  # type: ignore[no-untyped-def]
    path, _, held_out, labels, table = fashion
    fp32_accuracy = float(np.mean(_fp32_predictions(path, held_out) == labels))
    assert fp32_accuracy < 0.99
    with pytest.raises(AccuracyBudgetError) as info:
        search_mixed_precision(
            path, table, INT8, held_out, "accuracy:0.99", labels=labels, max_samples=100
        )
    assert "all 4 quantizable nodes" in info.value.message and "accuracy" in info.value.message
    assert info.value.hint and info.value.field == "budget"


def _fp32_predictions(path: Path, data: CalibrationDataset) -> np.ndarray:
    with OnnxRuntimeRunner(path) as runner:
        return np.concatenate([runner.run(b)["logits"].argmax(1) for b in data.batches(100)])


def test_user_keep_rules_are_respected(fashion) -> None:  # type: ignore[no-untyped-def]
    path, _, held_out, _, table = fashion
    spec = INT8.model_copy(update={"keep": KeepRules(int8=("/0/Conv",))})
    report = node_sensitivity(path, table, spec, held_out, samples=16, all_but_this=False)
    assert "/0/Conv" not in report.ranked_nodes and report.quantizable_nodes == 3


def test_non_int8_spec_and_unreported_metric_are_spec_errors(fashion) -> None:  # type: ignore[no-untyped-def]
    path, _, held_out, _, table = fashion
    with pytest.raises(SpecError):
        node_sensitivity(path, table, INT8.model_copy(update={"precision": Precision.FP16}), held_out)
    with pytest.raises(SpecError):  # accuracy needs labels
        node_sensitivity(path, table, INT8, held_out, metric=AccuracyMetric.ACCURACY, samples=8)


def test_sensitivity_on_tiny_cnn(tiny_cnn_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (96, 3, 16, 16)).astype(np.float32)
    data = CalibrationDataset.from_arrays({"image": images[:64]})
    held_out = CalibrationDataset.from_arrays({"image": images[64:]})
    table = calibrate(tiny_cnn_path, data, entropy())
    report = node_sensitivity(
        tiny_cnn_path, table, INT8, held_out, metric=AccuracyMetric.COSINE, samples=32
    )
    full = prepare_model(onnx.load(str(tiny_cnn_path)), INT8, table).quantization
    assert full is not None
    assert sorted(report.ranked_nodes) == sorted(full.quantized_nodes)
    values = [n.metric_only_this for n in report.nodes]
    assert all(v is not None and 0.9 < v <= 1.0 + 1e-9 for v in values)
    assert values == sorted(values)  # cosine: most sensitive = lowest only-this cosine first
    assert all(math.isfinite(n.proxy_sqnr_db) for n in report.nodes if n.op_type == "Conv")
    assert SensitivityReportRoundTrip.check(report)


class SensitivityReportRoundTrip:
    @staticmethod
    def check(report: object) -> bool:
        from engines.mixed import SensitivityReport

        assert isinstance(report, SensitivityReport)
        return SensitivityReport.model_validate_json(report.model_dump_json()) == report


def test_memoized_runner_runs_each_distinct_batch_once(tiny_cnn_path: Path) -> None:
    calls: list[int] = []

    class Counting(OnnxRuntimeRunner):
        def run(self, feeds):  # type: ignore[no-untyped-def]
            calls.append(1)
            return super().run(feeds)

    rng = np.random.default_rng(1)
    a = {"image": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)}
    b = {"image": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)}
    with MemoizedRunner(Counting(tiny_cnn_path)) as memo:
        first = memo.run(a)
        again = memo.run({"image": a["image"].copy()})
        other = memo.run(b)
    assert len(calls) == 2
    np.testing.assert_array_equal(first["logits"], again["logits"])
    assert not np.array_equal(first["logits"], other["logits"])

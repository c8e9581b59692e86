"""The accuracy-budget search on the small (Fashion-MNIST-shaped) CNN, on real artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import entropy
from calibrators.table import CalibrationTable
from engines.accuracy import compare
from engines.accuracy_report import AccuracyMetric, MetricBudget
from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.build import build_artifact
from engines.errors import AccuracyBudgetError, SpecError
from engines.graph import load_model, prepare_model
from engines.mixed import (
    MixedPrecisionResult,
    ranking_metric,
    search_mixed_precision,
    search_split,
)
from engines.spec import BuildSpec, KeepRules
from engines.variants import QdqExecution
from tests import zoo
from tests.unit.engines.test_sensitivity import INT8, Small, damaged, small  # noqa: F401

Labelled = tuple[Path, CalibrationDataset, np.ndarray, CalibrationTable]


@pytest.fixture(scope="module")
def labelled(small: Small) -> Labelled:  # noqa: F811
    """The small CNN, its 300 held-out images, their labels and the table. A label is the FP32
    model's own prediction, moved to the next class on every fifth image: FP32 is exactly 80%
    accurate, and INT8's accuracy moves with its disagreements with FP32."""
    path, held_out, table = small
    with OnnxRuntimeRunner(path) as runner:
        batches = held_out.batches(100)
        predictions = np.concatenate([runner.run(b)["logits"].argmax(1) for b in batches])
    assert len(set(predictions.tolist())) == 10  # every class is predicted on some images
    labels = predictions.copy()
    labels[::5] = (labels[::5] + 1) % 10
    return path, held_out, labels, table


def artifact_value(
    path: Path,
    spec: BuildSpec,
    table: CalibrationTable,
    held_out: CalibrationDataset,
    labels: np.ndarray,
    budget: MetricBudget,
    out: Path,
) -> tuple[float, bool]:
    """Build the artifact for real and compare it with the FP32 model: (budget value, passed)."""
    artifact = build_artifact(path, spec, table, out)
    with OnnxRuntimeRunner(path) as ref, OnnxRuntimeRunner(artifact.path) as cand:
        report = compare(ref, cand, held_out, labels=labels, budget=budget)
    assert report.budget_value is not None and report.passed is not None
    return report.budget_value, report.passed


def test_ranking_metric_replaces_class_counts_with_sqnr() -> None:
    assert ranking_metric(AccuracyMetric.TOP1_AGREEMENT) is AccuracyMetric.SQNR_DB
    assert ranking_metric(AccuracyMetric.ACCURACY_DROP) is AccuracyMetric.SQNR_DB
    assert ranking_metric(AccuracyMetric.COSINE) is AccuracyMetric.COSINE
    assert ranking_metric(AccuracyMetric.MAX_ABS_ERROR) is AccuracyMetric.MAX_ABS_ERROR


def test_search_keeps_exactly_the_damaged_nodes(labelled: Labelled, tmp_path: Path) -> None:
    path, held_out, labels, table = labelled
    bad = damaged(path, table, ["conv2", "fc1"])
    budget = MetricBudget.parse("top1_agreement:0.95")
    result = search_mixed_precision(
        path, bad, INT8, held_out, budget, labels=labels, max_samples=None
    )
    assert isinstance(result, MixedPrecisionResult)
    assert result.search_value_full_int8 < 0.5  # full INT8 with the damaged table misses
    assert result.sensitivity is not None
    assert set(result.kept_nodes) == {"conv2", "fc1"}
    assert result.kept_nodes == result.sensitivity.ranked_nodes[:2]
    assert result.quantizable_nodes == 4 and result.int8_nodes == 2
    assert result.int8_share == pytest.approx(0.5)
    assert result.search_value_reached >= 0.95 and result.search_accuracy.passed is True
    # The default split halves the 300 held-out samples; the figures come from the other half.
    search, report = result.search_indices, result.report_indices
    assert (len(search), len(report)) == (150, 150) and not set(search) & set(report)
    assert result.search_samples == result.search_accuracy.samples == 150
    assert result.samples == result.accuracy.samples == 150
    assert result.budget_met is (result.value_reached >= 0.95)
    # full INT8, one "only this" variant per node, a bisection over 4 nodes (k = 2, then 1),
    # then full INT8 and the chosen mix on the report split
    assert result.evaluations == 1 + result.sensitivity.evaluations + 2 + 2
    # The real artifact with the kept nodes measures the reported figure on the report split...
    spec = result.apply_to(INT8)
    assert spec.keep.int8 == tuple(result.kept_nodes) == tuple(result.keep_patterns)
    split, split_labels = held_out.subset(report), labels[report]
    value, passed = artifact_value(path, spec, bad, split, split_labels, budget, tmp_path / "a.onnx")
    assert passed and value == pytest.approx(result.value_reached, abs=0.01)
    # ...and full INT8 with the same table does not meet it.
    value, passed = artifact_value(path, INT8, bad, split, split_labels, budget, tmp_path / "b.onnx")
    assert not passed and value == pytest.approx(result.value_full_int8, abs=0.01)


def test_met_budget_keeps_nothing(labelled: Labelled) -> None:
    path, held_out, labels, table = labelled
    result = search_mixed_precision(
        path, table, INT8, held_out, "accuracy_drop:0.05", labels=labels
    )
    assert result.kept_nodes == [] and result.sensitivity is None
    assert result.evaluations == 2  # full INT8 on each split
    assert result.search_samples == result.samples == 150
    assert result.int8_share == 1.0 and result.int8_nodes == result.quantizable_nodes == 4
    assert result.search_value_reached == result.search_value_full_int8 <= 0.05
    # INT8 does change some predictions: the budget is met, not vacuous.
    assert result.search_accuracy.output("logits").top1_agreement < 1.0  # type: ignore[operator]
    assert result.value_reached == result.value_full_int8
    assert result.accuracy.output("logits").reference_accuracy is not None
    assert MixedPrecisionResult.model_validate_json(result.model_dump_json()) == result


def test_the_reported_figure_comes_from_the_report_split(small: Small) -> None:  # noqa: F811
    """Search on ordinary images, report on images 6x brighter than anything calibrated: the
    mix that meets the budget where it was chosen misses it where it is reported, and the
    result says so instead of repeating the search's own figure."""
    path, held_out, table = small
    bad = damaged(path, table, ["conv2", "fc1"])
    images = np.concatenate([b["image"] for b in held_out.batches(100, max_samples=200)])
    images[100:] *= 6.0
    data = CalibrationDataset.from_arrays({"image": images})
    result = search_mixed_precision(
        path,
        bad,
        INT8,
        data,
        "sqnr_db:20",
        search_indices=range(100),
        report_indices=range(100, 200),
    )
    assert set(result.kept_nodes) == {"conv2", "fc1"}
    assert result.search_value_reached >= 20 > result.value_reached
    assert result.budget_met is False and result.accuracy.passed is False
    assert result.search_indices == list(range(100)) and result.samples == 100


@pytest.mark.parametrize("nodes", [["fc1"], ["conv2", "fc1", "fc2"]])
def test_the_search_bisects(small: Small, nodes: list[str]) -> None:  # noqa: F811
    """Over 4 ranked nodes the bisection tries keep(2), then keep(1) or keep(3): two variants
    whichever of them is the answer (a linear search would take one, or three)."""
    path, held_out, table = small
    bad = damaged(path, table, nodes)
    result = search_mixed_precision(path, bad, INT8, held_out, "sqnr_db:20", max_samples=64)
    assert result.sensitivity is not None
    assert set(result.kept_nodes) == set(nodes)
    assert result.search_value_full_int8 < 20 <= result.search_value_reached
    assert result.evaluations == 1 + result.sensitivity.evaluations + 2 + 2


def test_splits_are_checked(labelled: Labelled) -> None:
    path, held_out, labels, table = labelled
    cases = {
        "overlap": ([0, 1, 2], [2, 3]),
        "distinct sample positions": ([0, 0, 1], [5]),
        r"\[0, 300\)": ([0, 300], [5]),
        "empty": ([], [5]),
    }
    for message, (search, report) in cases.items():
        with pytest.raises(SpecError, match=message) as info:
            search_mixed_precision(
                path,
                table,
                INT8,
                held_out,
                "cosine:0.9",
                search_indices=search,
                report_indices=report,
            )
        assert info.value.field == "budget"
    with pytest.raises(SpecError, match="at least 2 held-out samples"):
        search_mixed_precision(path, table, INT8, held_out.subset([0]), "cosine:0.9")
    with pytest.raises(SpecError, match="labels") as bad_labels:
        search_mixed_precision(path, table, INT8, held_out, "cosine:0.9", labels=labels[:10])
    assert bad_labels.value.field == "labels"
    # One split given: the other is the rest.
    result = search_mixed_precision(
        path, table, INT8, held_out, "cosine:0.5", search_indices=range(0, 300, 3), max_samples=20
    )
    assert result.search_indices == list(range(0, 300, 3))
    assert result.report_indices == [i for i in range(300) if i % 3]
    assert result.search_samples == result.samples == 20  # max_samples caps each split


def test_search_split_is_a_seeded_half() -> None:
    search, report = search_split(9)
    assert len(search) == 5 and len(report) == 4
    assert sorted(search + report) == list(range(9)) and search == sorted(search)
    assert search_split(9) == (search, report) and search_split(9, seed=1) != (search, report)


def test_kept_nodes_of_the_search_are_labelled(small: Small) -> None:  # noqa: F811
    path, held_out, table = small
    bad = damaged(path, table, ["conv2", "fc1"])
    result = search_mixed_precision(path, bad, INT8, held_out, "sqnr_db:20", max_samples=64)
    assert set(result.kept_nodes) == {"conv2", "fc1"}
    spec = result.apply_to(INT8.model_copy(update={"keep": KeepRules(int8=("conv1",))}))
    artifact_kept = prepare_model(load_model(path), spec, bad).kept_nodes
    labelled = result.label_kept_nodes(artifact_kept)
    why = "not INT8: accuracy budget search (sqnr_db >= 20)"
    assert labelled == {"conv2": why, "fc1": why, "conv1": "not INT8: kept by user"}
    fp32 = {"conv2": "not INT8: kept by user; FP32: kept by user", "x": "FP32: range"}
    assert result.label_kept_nodes(fp32) == {
        "conv2": f"{why}; FP32: kept by user",
        "x": "FP32: range",
    }


def test_impossible_budget_raises(labelled: Labelled) -> None:
    path, held_out, labels, table = labelled
    with OnnxRuntimeRunner(path) as runner:
        predictions = np.concatenate(
            [runner.run(b)["logits"].argmax(1) for b in held_out.batches(100)]
        )
    assert float(np.mean(predictions == labels)) == pytest.approx(0.8)  # FP32 itself: 80%
    with pytest.raises(AccuracyBudgetError) as info:
        search_mixed_precision(
            path, table, INT8, held_out, "accuracy:0.99", labels=labels, max_samples=100
        )
    assert "all 4 quantizable nodes" in info.value.message
    # the value it reached with no INT8 at all is FP32's accuracy on the searched samples
    searched = search_split(300)[0][:100]
    fp32_accuracy = float(np.mean(predictions[searched] == labels[searched]))
    assert f"accuracy is {fp32_accuracy:.6g} " in info.value.message
    assert "accuracy >= 0.99" in info.value.message
    assert info.value.hint and info.value.field == "budget"


@pytest.mark.slow
def test_efficientnet_search_with_a_bounded_number_of_evaluations() -> None:
    path = zoo.efficientnet_lite0()
    images = zoo.preprocess_imagenet(zoo.photo_crops(48, seed=0))
    table = calibrate(path, CalibrationDataset.from_arrays({"input": images[:32]}), entropy())
    held_out = CalibrationDataset.from_arrays({"input": images[32:]})
    result = search_mixed_precision(
        path,
        table,
        INT8,
        held_out,
        "cosine:0.995",
        max_nodes=4,
        all_but_this=False,
        sensitivity_samples=8,
        execution=QdqExecution.REFERENCE,
    )
    assert result.search_value_full_int8 < 0.995 <= result.search_value_reached
    assert result.sensitivity is not None and result.sensitivity.quantizable_nodes == 60
    ranked = result.sensitivity.nodes
    assert [n.metric_only_this is not None for n in ranked] == [True] * 4 + [False] * 56
    # full INT8 + 4 ranked nodes + a bisection over 60 (at most 6 steps, plus "no INT8"), then
    # full INT8 and the chosen mix on the report split
    assert result.evaluations <= 1 + 4 + 7 + 2
    assert result.kept_nodes == [n.node for n in ranked[: len(result.kept_nodes)]]
    assert 0 < result.int8_share < 1

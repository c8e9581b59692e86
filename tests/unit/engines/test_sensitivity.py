"""Per-node INT8 sensitivity on the small (Fashion-MNIST-shaped) CNN and the tiny CNN."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import entropy
from calibrators.table import CalibrationTable
from engines.accuracy_report import AccuracyMetric
from engines.backends.onnxruntime import OnnxRuntimeRunner, default_providers, int8_weight_levels
from engines.errors import SpecError
from engines.graph import prepare_model
from engines.sensitivity import SensitivityReport, node_sensitivity
from engines.spec import BackendName, BuildSpec, KeepRules, Precision, node_matches
from engines.variants import MemoizedRunner, QdqExecution, default_execution, keep_patterns
from tests import zoo

INT8 = BuildSpec(precision=Precision.INT8, backend=BackendName.ONNXRUNTIME)
Small = tuple[Path, CalibrationDataset, CalibrationTable]


@pytest.fixture(scope="module")
def small(small_cnn_path: Path) -> Small:
    """The small CNN, 300 held-out images, a table calibrated on 512 other images."""
    calibration = CalibrationDataset.from_arrays({"image": zoo.small_images(512, seed=1)})
    table = calibrate(small_cnn_path, calibration, entropy())
    held_out = CalibrationDataset.from_arrays({"image": zoo.small_images(300, seed=2)})
    return small_cnn_path, held_out, table


def quantized_activations(model: onnx.ModelProto, node: str) -> list[str]:
    """Activation tensors whose Q/DQ pair feeds ``node`` in a Q/DQ model."""
    producer = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name for t in model.graph.initializer}
    target = next(n for n in model.graph.node if n.name == node)
    found = []
    for tensor in target.input:
        dq = producer.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer[dq.input[0]]
            if q.input[0] not in inits:
                found.append(q.input[0])
    return found


def damaged(
    path: Path, table: CalibrationTable, nodes: list[str], factor: float = 8.0
) -> CalibrationTable:
    """``table`` with the ranges of the activations feeding ``nodes`` shrunk ``factor`` times."""
    qdq = prepare_model(onnx.load(str(path)), INT8, table).model
    names = {t for node in nodes for t in quantized_activations(qdq, node)}
    assert names, f"no quantized activation feeds {nodes}"
    amax = {k: v / factor if k in names else v for k, v in table.amax.items()}
    return table.model_copy(update={"amax": amax})


def test_damaged_nodes_rank_first(small: Small) -> None:
    path, held_out, table = small
    bad = damaged(path, table, ["conv2", "fc1"])
    report = node_sensitivity(path, bad, INT8, held_out, samples=64)
    assert report.metric is AccuracyMetric.SQNR_DB and report.higher_is_better
    assert report.execution is QdqExecution.ONNXRUNTIME
    assert report.quantizable_nodes == len(report.nodes) == report.evaluated_nodes == 4
    assert report.evaluations == 8 and report.samples == 64  # two variants per node
    assert [n.rank for n in report.nodes] == [1, 2, 3, 4]
    assert set(report.ranked_nodes[:2]) == {"conv2", "fc1"}
    by_name = {n.node: n for n in report.nodes}
    assert {n: by_name[n].op_type for n in by_name} == {
        "conv1": "Conv",
        "conv2": "Conv",
        "fc1": "Gemm",
        "fc2": "Gemm",
    }
    only = {n: v.metric_only_this for n, v in by_name.items()}
    all_but = {n: v.metric_all_but_this for n, v in by_name.items()}
    proxy = {n: v.proxy_sqnr_db for n, v in by_name.items()}
    # Quantizing a damaged node alone costs much more SQNR than quantizing a healthy one alone;
    # keeping a damaged node out of INT8 helps more than keeping a healthy one; and the cheap
    # proxy (local quantization SQNR) sees the damage too.
    for bad_node in ("conv2", "fc1"):
        for good_node in ("conv1", "fc2"):
            assert only[bad_node] < only[good_node] - 6  # type: ignore[operator]
            assert all_but[bad_node] > all_but[good_node]  # type: ignore[operator]
            assert proxy[bad_node] < proxy[good_node] - 6
    assert SensitivityReport.model_validate_json(report.model_dump_json()) == report


def test_max_nodes_evaluates_the_proxy_worst_first(small: Small) -> None:
    path, held_out, table = small
    bad = damaged(path, table, ["fc1"])
    report = node_sensitivity(
        path, bad, INT8, held_out, samples=32, max_nodes=1, all_but_this=False
    )
    assert report.evaluated_nodes == 1 and report.evaluations == 1
    first, *rest = report.nodes
    assert first.node == "fc1"
    assert first.metric_only_this is not None and first.metric_all_but_this is None
    assert all(n.metric_only_this is None and n.metric_all_but_this is None for n in rest)
    proxies = [n.proxy_sqnr_db for n in report.nodes]
    assert proxies == sorted(proxies)  # unevaluated nodes follow in proxy order


def test_onnxruntime_execution_mirrors_the_backend_and_reference_is_full_int8(
    small: Small,
) -> None:
    path, held_out, table = small
    fused = node_sensitivity(path, table, INT8, held_out, samples=32, all_but_this=False)
    exact = node_sensitivity(
        path,
        table,
        INT8,
        held_out,
        samples=32,
        all_but_this=False,
        execution=QdqExecution.REFERENCE,
    )
    assert fused.execution is QdqExecution.ONNXRUNTIME and exact.execution is QdqExecution.REFERENCE
    # The same weight levels the onnxruntime backend builds artifacts with (63 on x86 CPUs
    # without VNNI), and full 8-bit weights for the reference (TensorRT's) execution.
    assert fused.weight_levels == int8_weight_levels(default_providers())[0]
    assert exact.weight_levels == 127
    assert sorted(exact.ranked_nodes) == sorted(fused.ranked_nodes)
    by_name = {n.node: n for n in exact.nodes}
    for node in fused.nodes:
        # Fewer weight levels can only lower a node's local SQNR (activations are the same).
        assert node.proxy_sqnr_db <= by_name[node.node].proxy_sqnr_db + 1e-9
        assert node.metric_only_this == pytest.approx(by_name[node.node].metric_only_this, abs=6)


def test_default_execution_follows_the_backend() -> None:
    assert default_execution(INT8) is QdqExecution.ONNXRUNTIME
    tensorrt = INT8.model_copy(update={"backend": BackendName.AUTO})
    # Without TensorRT here, auto resolves to onnxruntime as well.
    assert default_execution(tensorrt) is QdqExecution.ONNXRUNTIME


def test_user_keep_rules_shrink_the_quantizable_set(small: Small) -> None:
    path, held_out, table = small
    spec = INT8.model_copy(update={"keep": KeepRules(int8=("conv1",))})
    report = node_sensitivity(path, table, spec, held_out, samples=16, all_but_this=False)
    assert "conv1" not in report.ranked_nodes and report.quantizable_nodes == 3


def test_spec_errors(small: Small) -> None:
    path, held_out, table = small
    fp16 = INT8.model_copy(update={"precision": Precision.FP16})
    with pytest.raises(SpecError, match="INT8 precision"):
        node_sensitivity(path, table, fp16, held_out)
    with pytest.raises(SpecError, match="labels"):
        node_sensitivity(path, table, INT8, held_out, metric=AccuracyMetric.ACCURACY, samples=8)


def test_sensitivity_on_tiny_cnn(tiny_cnn_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (96, 3, 16, 16)).astype(np.float32)
    table = calibrate(
        tiny_cnn_path, CalibrationDataset.from_arrays({"image": images[:64]}), entropy()
    )
    held_out = CalibrationDataset.from_arrays({"image": images[64:]})
    report = node_sensitivity(
        tiny_cnn_path, table, INT8, held_out, metric=AccuracyMetric.COSINE, samples=32
    )
    full = prepare_model(onnx.load(str(tiny_cnn_path)), INT8, table).quantization
    assert full is not None
    assert sorted(report.ranked_nodes) == sorted(full.quantized_nodes)
    only = [n.metric_only_this or 0.0 for n in report.nodes]
    assert all(0.0 < v <= 1.0 + 1e-9 for v in only)
    assert only == sorted(only)  # cosine: the lowest "only this" cosine is the most sensitive
    # The random-weight fc reads a badly calibrated tensor: the measurement and the cheap proxy
    # agree that it is by far the worst node.
    worst = report.nodes[0]
    assert worst.node == "fc" and worst.metric_only_this < 0.9  # type: ignore[operator]
    assert worst.proxy_sqnr_db == min(n.proxy_sqnr_db for n in report.nodes) < 10
    assert all(math.isfinite(n.proxy_sqnr_db) for n in report.nodes)


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


def test_keep_patterns_match_exactly_the_named_nodes() -> None:
    patterns = keep_patterns(["/conv1/Conv", "Add", "re:odd.name"], {"Add", "Conv"})
    assert patterns == ("/conv1/Conv", r"re:Add", r"re:re:odd\.name")
    # A node named like an op type is matched by its name only, not every node of that type.
    assert node_matches((patterns[1],), "Add", "Add")
    assert not node_matches((patterns[1],), "residual", "Add")
    assert node_matches((patterns[2],), "re:odd.name", "Relu")
    assert not node_matches((patterns[2],), "re:oddXname", "Relu")

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrators.data import CalibrationDataset
from calibrators.weights import fake_quantize_weight
from engines.graph.bias import correct_biases, sqnr_db
from engines.graph.layer_stats import LayerStats, collect_layer_stats
from engines.graph.qdq import insert_qdq
from engines.spec import TechniqueMode
from tests.unit.engines.graph.helpers import initializer, run, table_from_activations

LEVELS = 15  # 4-bit-like weights make the weight error large enough to see in a small test


def _model() -> onnx.ModelProto:
    """Conv(B) -> Relu -> Conv(no bias) -> GAP -> Flatten -> MatMul -> Add(bias) -> Gemm(C)."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)),
        "b1": rng.normal(0, 0.1, 8),
        "w2": rng.normal(0, 0.3, (8, 8, 1, 1)),
        "w3": rng.normal(0, 0.3, (8, 6)),
        "b3": rng.normal(0, 0.1, 6),
        "w4": rng.normal(0, 0.3, (5, 6)),
        "c4": rng.normal(0, 0.1, (1, 5)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w3"], ["m"], name="mm"),
        helper.make_node("Add", ["b3", "m"], ["a"], name="bias_add"),
        helper.make_node("Gemm", ["a", "w4", "c4"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0),
    ]
    graph = helper.make_graph(
        nodes,
        "biased",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _data(count: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(1.0, 0.5, (count, 3, 6, 6))  # nonzero channel means
    return x.astype(np.float32)


def _stats(model: onnx.ModelProto, tmp_path: Path) -> LayerStats:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return collect_layer_stats(path, CalibrationDataset.from_arrays({"x": _data(64, 1)}))


def test_biases_take_the_mean_weight_error(tmp_path: Path) -> None:
    model = _model()
    stats = _stats(model, tmp_path)
    table = table_from_activations(model, {"x": _data(64, 1)})
    corrected, report = correct_biases(
        model, stats, table, mode=TechniqueMode.ON, weight_levels=LEVELS
    )
    onnx.checker.check_model(corrected, full_check=True)
    assert [c.node for c in report.layers] == ["conv1", "mm", "gemm"]
    assert report.skipped == {"conv2": "no bias"}
    assert all(c.applied for c in report.layers)

    # conv1: b += sum over the window of dW * E[x_c] (padding ignored)
    w1 = initializer(model, "w1")
    dw = w1 - fake_quantize_weight(w1, 0, LEVELS)
    expected = initializer(model, "b1") + np.einsum("kcij,c->k", dw, stats.inputs["conv1"].mean)
    np.testing.assert_allclose(initializer(corrected, "b1"), expected, rtol=1e-5, atol=1e-7)
    # gemm: C += alpha / beta * E[x] @ dW^T
    w4 = initializer(model, "w4")
    dw4 = w4 - fake_quantize_weight(w4, 0, LEVELS)
    shift = 0.5 / 2.0 * dw4 @ stats.inputs["gemm"].mean
    np.testing.assert_allclose(
        initializer(corrected, "c4"), initializer(model, "c4") + shift, rtol=1e-5, atol=1e-7
    )
    assert initializer(corrected, "c4").shape == (1, 5)

    # The quantized model's mean output error shrinks on held-out data.
    held_out = {"x": _data(64, 2)}
    reference = run(model, held_out)["y"]
    plain, _ = insert_qdq(model, table, weight_levels=LEVELS)
    fixed, _ = insert_qdq(corrected, table, weight_levels=LEVELS)
    err_plain = run(plain, held_out, optimize=False)["y"] - reference
    err_fixed = run(fixed, held_out, optimize=False)["y"] - reference
    assert np.abs(err_fixed.mean(0)).max() < 0.5 * np.abs(err_plain.mean(0)).max()
    assert sqnr_db(reference, reference + err_fixed) > sqnr_db(reference, reference + err_plain)


def test_auto_keeps_only_corrections_that_help_and_off_changes_nothing(tmp_path: Path) -> None:
    model = _model()
    stats = _stats(model, tmp_path)
    table = table_from_activations(model, {"x": _data(64, 1)})
    _, report = correct_biases(model, stats, table, weight_levels=LEVELS)
    assert report.mode == "auto"
    for layer in report.layers:
        assert layer.applied == (layer.sqnr_after_db >= layer.sqnr_before_db + 0.1)
    assert report.corrected  # the weight error is large: some layer gains
    unchanged, off = correct_biases(model, stats, table, mode=TechniqueMode.OFF)
    assert off.layers == [] and off.corrected == []
    assert [t.name for t in unchanged.graph.initializer] == [t.name for t in model.graph.initializer]
    for name in ("b1", "b3", "c4"):
        np.testing.assert_array_equal(initializer(unchanged, name), initializer(model, name))


def test_kept_layers_and_shared_biases(tmp_path: Path) -> None:
    model = _model()
    model.graph.node.append(helper.make_node("Add", ["y", "b3"], ["unused"], name="share"))
    stats = _stats(_model(), tmp_path)
    table = table_from_activations(_model(), {"x": _data(16, 1)})
    corrected, report = correct_biases(
        model, stats, table, mode=TechniqueMode.ON, keep=("conv1",), weight_levels=LEVELS
    )
    assert "conv1" not in [c.node for c in report.layers]  # not quantized: not corrected
    mm = next(c for c in report.layers if c.node == "mm")
    assert mm.bias != "b3"  # b3 is read by another node too: the shift goes into a copy
    np.testing.assert_array_equal(initializer(corrected, "b3"), initializer(model, "b3"))


def test_auto_leaves_sequence_layers_unless_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["y"], name="bias_add"),
        ],
        "sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 4])],
        [
            numpy_helper.from_array(rng.normal(0, 0.3, (6, 4)).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.normal(1.0, 0.5, (16, 5, 6)).astype(np.float32)
    path = tmp_path / "seq.onnx"
    onnx.save(model, path)
    stats = collect_layer_stats(path, CalibrationDataset.from_arrays({"x": x}))
    table = table_from_activations(model, {"x": x})
    _, auto = correct_biases(model, stats, table, weight_levels=LEVELS)
    assert auto.layers == [] and auto.skipped["mm"].startswith("reads a sequence")
    _, asked = correct_biases(model, stats, table, weight_levels=LEVELS, sequence_layers=True)
    _, forced = correct_biases(model, stats, table, mode=TechniqueMode.ON, weight_levels=LEVELS)
    assert [c.node for c in asked.layers] == [c.node for c in forced.layers] == ["mm"]

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.collect import collect
from calibrators.data import CalibrationDataset
from engines.graph._layers import layer_output, linear_layers
from engines.graph.inspect import normalize
from engines.graph.layer_stats import LayerStatsObserver, collect_layer_stats
from tests.unit.engines.graph.helpers import activations


def _conv_model(**attrs: object) -> onnx.ModelProto:
    groups = int(attrs.get("group", 1))  # type: ignore[call-overload]
    w = np.random.default_rng(0).normal(size=(6, 6 // groups, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 9, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 2, 1, 0], "strides": [2, 1], "dilations": [1, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER"},
        {"group": 3, "pads": [1, 1, 1, 1]},
        {"group": 6, "pads": [1, 1, 1, 1], "strides": [2, 2]},
    ],
)
def test_conv_rows_reproduce_the_output(attrs: dict[str, object]) -> None:
    model = _conv_model(**attrs)
    (layer,) = linear_layers(normalize(model))
    x = np.random.default_rng(1).normal(size=(2, 6, 9, 7)).astype(np.float32)
    y = activations(model, {"x": x})["y"]
    assert layer.positions(x.shape) == y.shape[0] * y.shape[2] * y.shape[3]
    chosen = np.arange(layer.positions(x.shape))
    w = numpy_helper.to_array(model.graph.initializer[0])
    out = layer_output(layer.rows(x, chosen), layer.matrix(w), layer.groups)
    np.testing.assert_allclose(out, y.transpose(0, 2, 3, 1).reshape(-1, 6), atol=1e-4)


def test_scaling_inputs_of_a_grouped_conv_is_exact() -> None:
    model = _conv_model(group=3, pads=[1, 1, 1, 1])
    (layer,) = linear_layers(normalize(model))
    w = numpy_helper.to_array(model.graph.initializer[0])
    x = np.random.default_rng(2).normal(size=(1, 6, 9, 7)).astype(np.float32)
    s = np.array([0.5, 2.0, 4.0, 1.0, 0.25, 3.0])
    chosen = np.arange(layer.positions(x.shape))
    rows = layer.rows(x, chosen)
    plain = layer_output(rows, layer.matrix(w), 3)
    moved = layer_output(
        rows / s.astype(np.float32)[None, :, None], layer.matrix(layer.scale_inputs(w, s)), 3
    )
    np.testing.assert_allclose(moved, plain, atol=1e-4)


def _mlp() -> onnx.ModelProto:
    """x -> MatMul -> Reshape -> Gemm(transB): the Gemm reads an alias the collector skips."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
            helper.make_node("Reshape", ["h", "shape"], ["flat"], name="reshape"),
            helper.make_node("Gemm", ["flat", "w2"], ["y"], name="gemm", transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "w1"),
            numpy_helper.from_array(np.array([-1, 10], np.int64), "shape"),
            numpy_helper.from_array(rng.normal(size=(3, 10)).astype(np.float32), "w2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_observer_streams_channel_statistics_and_replays_aliases(tmp_path: Path) -> None:
    model = _mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(4).normal(size=(40, 2, 4)).astype(np.float32)
    x[:, :, 2] *= 10.0  # one wide channel
    observer = LayerStatsObserver(model, max_rows=32)
    seen = collect(path, CalibrationDataset.from_arrays({"x": x}), observer, batch_size=7)
    stats = observer.result()
    assert seen == stats.samples == 40 and not stats.missing
    mm, gemm = stats.inputs["mm"], stats.inputs["gemm"]
    np.testing.assert_allclose(mm.absmax, np.abs(x).max(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(mm.mean, x.mean(axis=(0, 1)), rtol=1e-5, atol=1e-7)
    assert mm.rows.shape == (32, 4, 1)  # 80 rows seen, 32 kept
    assert (mm.rank, gemm.rank) == (3, 2)
    flat = x.reshape(-1, 4)
    assert all(any(np.array_equal(r, f) for f in flat) for r in mm.rows[:, :, 0])
    h = (x @ numpy_helper.to_array(model.graph.initializer[0])).reshape(40, 10)
    np.testing.assert_allclose(gemm.absmax, np.abs(h).max(axis=0), rtol=1e-5)
    assert gemm.rows.shape == (32, 10, 1)
    assert gemm.layer.trans_b and gemm.layer.activation == "flat"


def test_collect_layer_stats_bounds_the_rows_of_wide_layers(tmp_path: Path) -> None:
    model = _conv_model(pads=[1, 1, 1, 1])
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(5).normal(size=(10, 6, 9, 7)).astype(np.float32)
    stats = collect_layer_stats(path, CalibrationDataset.from_arrays({"x": x}), max_rows=50)
    rows = stats.inputs["conv"].rows
    assert rows.shape == (50, 6, 9)
    scaled = stats.inputs["conv"].divided(np.full(6, 2.0))
    np.testing.assert_allclose(scaled.rows, rows / 2)
    np.testing.assert_allclose(scaled.absmax, stats.inputs["conv"].absmax / 2)


def test_grouped_collection_gives_the_same_statistics(tmp_path: Path) -> None:
    model = _mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    data = CalibrationDataset.from_arrays(
        {"x": np.random.default_rng(6).normal(size=(12, 2, 4)).astype(np.float32)}
    )
    whole = collect_layer_stats(path, data, batch_size=4)
    grouped = collect_layer_stats(path, data, batch_size=4, memory_limit_bytes=64)
    assert grouped.samples == whole.samples == 12
    for name in ("mm", "gemm"):
        np.testing.assert_array_equal(grouped.inputs[name].absmax, whole.inputs[name].absmax)
        np.testing.assert_allclose(grouped.inputs[name].mean, whole.inputs[name].mean)

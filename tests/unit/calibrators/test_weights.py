"""Weight quantization shared by the Q/DQ pass and auto: axes, scales, floor, fake quantization."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.table import CalibrationTable
from calibrators.weights import (
    WEIGHT_SCALE_FLOOR,
    fake_quantize,
    fake_quantize_weight,
    node_weight_axis,
    quantize_weight,
    weight_axis,
    weight_scales,
)
from engines.graph.qdq import insert_qdq


def run_qdq(values: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear in ONNX Runtime (the reference semantics)."""
    zero = np.zeros(scale.shape, np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(values.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(values.shape))],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": values})[0])


def test_axis_rule() -> None:
    assert weight_axis("Conv", 4) == 0
    assert weight_axis("ConvTranspose", 4) == 1
    assert weight_axis("Gemm", 2) == 1
    assert weight_axis("Gemm", 2, trans_b=True) == 0
    assert weight_axis("MatMul", 2) == 1
    assert weight_axis("MatMul", 3) is None
    assert weight_axis("ConvTranspose", 1) is None  # no such axis: one scale
    with pytest.raises(ValueError, match="Relu has no quantized weight"):
        weight_axis("Relu", 2)
    gemm = helper.make_node("Gemm", ["a", "b"], ["c"], transB=1)
    assert node_weight_axis(gemm, 2) == 0


def test_scales_per_channel_and_per_tensor() -> None:
    w = np.array([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        weight_scales(w, 0),
        np.array([2.0 / 127, 0.5 / 127, WEIGHT_SCALE_FLOOR], dtype=np.float32),
    )
    np.testing.assert_array_equal(weight_scales(w, 1), np.float32([1.0 / 127, 2.0 / 127]))
    assert weight_scales(w, None).shape == ()
    assert float(weight_scales(w, None)) == np.float32(2.0 / 127)
    assert float(weight_scales(w, None, levels=63)) == np.float32(2.0 / 63)
    with pytest.raises(ValueError, match="NaN or Inf"):
        weight_scales(np.array([np.nan], np.float32), None)


def test_denormal_channel_gets_a_normal_float16_scale_and_quantizes_to_zero() -> None:
    w = np.ones((3, 2, 1, 1), dtype=np.float32) * 0.3
    w[1] = np.float32(3.2e-40)  # seen in a real detector's 1x1 Conv
    w[2] = 0.0
    w[2, 0] = -np.float32(1e-45)
    scales = weight_scales(w, 0)
    assert np.all(scales >= WEIGHT_SCALE_FLOOR)
    half = scales.astype(np.float16)
    assert np.all(np.abs(half) >= np.finfo(np.float16).tiny)  # normal in float16 too
    np.testing.assert_array_equal(half[1:].astype(np.float32), scales[1:])  # the floor is exact
    q, _ = quantize_weight(w, 0)
    assert not np.any(q[1]) and not np.any(q[2])
    deq = fake_quantize_weight(w, 0)
    assert not np.any(deq[1]) and not np.any(deq[2])
    assert np.all(np.isfinite(deq))


def test_fake_quantize_weight_equals_onnx_runtime_qdq() -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * rng.uniform(1e-3, 2, (8, 1, 1, 1))).astype(np.float32)
    w[3] = 1e-3 * rng.standard_normal((3, 3, 3))  # a channel under the floor's threshold
    for axis in (0, 1, None):
        scale = weight_scales(w, axis)
        expected = run_qdq(w, scale, 0 if axis is None else axis)
        np.testing.assert_array_equal(fake_quantize_weight(w, axis), expected)


def test_fake_quantize_activation_clips_and_rounds_like_onnx_runtime() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    amax = 2.0
    expected = run_qdq(x, np.asarray(np.float32(amax / 127)), 0)
    np.testing.assert_array_equal(fake_quantize(x, amax), expected)
    assert float(fake_quantize(x, amax).max()) == np.float32(amax / 127) * 127
    assert float(fake_quantize(x, amax).min()) == np.float32(amax / 127) * -128  # as Q/DQ saturates
    buffer = x.copy()
    assert fake_quantize(buffer, amax, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, expected)
    np.testing.assert_array_equal(fake_quantize(x, 0.0), np.zeros_like(x))


def _model(
    node: onnx.NodeProto, x_shape: list[int], w: np.ndarray, y_shape: list[int]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("node", "x_shape", "w_shape", "y_shape"),
    [
        (
            helper.make_node("Conv", ["x", "w"], ["y"], name="n"),
            [1, 2, 4, 4],
            (3, 2, 1, 1),
            [1, 3, 4, 4],
        ),
        (
            helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="n"),
            [1, 2, 4, 4],
            (2, 3, 1, 1),
            [1, 3, 4, 4],
        ),
        (helper.make_node("Gemm", ["x", "w"], ["y"], name="n", transB=1), [2, 4], (3, 4), [2, 3]),
        (helper.make_node("Gemm", ["x", "w"], ["y"], name="n"), [2, 4], (4, 3), [2, 3]),
        (helper.make_node("MatMul", ["x", "w"], ["y"], name="n"), [2, 5, 4], (4, 3), [2, 5, 3]),
    ],
)
def test_axis_rule_matches_the_qdq_pass(
    node: onnx.NodeProto, x_shape: list[int], w_shape: tuple[int, ...], y_shape: list[int]
) -> None:
    w = np.random.default_rng(2).standard_normal(w_shape).astype(np.float32)
    out, _ = insert_qdq(_model(node, x_shape, w, y_shape), CalibrationTable(amax={"x": 1.0}))
    dq = next(
        n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")
    )
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    assert axis == node_weight_axis(node, w.ndim)
    scale = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.name == dq.input[1])
    np.testing.assert_array_equal(scale, weight_scales(w, axis))

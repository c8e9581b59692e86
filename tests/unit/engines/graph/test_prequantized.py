from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibrators.spec import CalibrationMethod
from calibrators.table import CalibrationTable
from engines.graph import prepare_model
from engines.graph.fp16 import convert_fp16
from engines.graph.prequantized import inspect_quantization, is_prequantized
from engines.graph.qdq import insert_qdq
from engines.spec import BuildSpec, Precision
from tests import zoo
from tests.unit.engines.graph.helpers import cosine_rows, initializer, run


def _modelopt_style_conv() -> onnx.ModelProto:
    """What a Model Optimizer export looks like: int8 weights behind a lone DequantizeLinear,
    the activation through QuantizeLinear -> DequantizeLinear, a float bias."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    w_scale = np.array([0.002, 0.003, 0.001, 0.004], np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"], name="x_q", axis=0),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], name="x_dq", axis=0),
        helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["w_dq"], name="w_dq", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["y"], name="mean", axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "modelopt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [
            numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
            numpy_helper.from_array(np.array(0, np.int8), "x_z"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(w_scale, "w_s"),
            numpy_helper.from_array(np.zeros(4, np.int8), "w_z"),
            numpy_helper.from_array(np.array([0.1, 0.0, -0.1, 0.2], np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _qdq_nodes(model: onnx.ModelProto) -> list[tuple[str, tuple[str, ...], dict[str, bytes]]]:
    """Each Q/DQ node with the bytes of its constant inputs (scales, zero points, int8 weights)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            constants = {
                name: numpy_helper.to_array(inits[name]).tobytes()
                for name in node.input
                if name in inits
            }
            out.append((node.op_type, tuple(node.input[1:]), constants))
    return out


def test_detection_reports_weights_activations_and_readers() -> None:
    model = _modelopt_style_conv()
    report = inspect_quantization(model)
    assert is_prequantized(model) and report.prequantized
    assert (report.quantize_nodes, report.dequantize_nodes) == (1, 2)
    assert report.quantized_weights == ["w"] and report.quantized_activations == ["x"]
    assert report.quantized_nodes == ["conv"] and not report.weight_only
    assert report.scale_source == "prequantized: scales from the model"

    plain = zoo.tiny_cnn()
    assert not is_prequantized(plain) and not inspect_quantization(plain).prequantized
    assert inspect_quantization(plain).scale_source is None


def test_our_own_qdq_output_reads_as_prequantized(tiny_table: CalibrationTable) -> None:
    quantized, first = insert_qdq(zoo.tiny_cnn(), tiny_table)
    report = inspect_quantization(quantized)
    assert report.quantize_nodes == report.dequantize_nodes == first.qdq_pairs
    assert set(report.quantized_weights) == {"conv1.w", "conv2.w", "conv3.w", "fc.w"}
    assert report.quantized_nodes == first.quantized_nodes


def test_integer_operator_format_is_prequantized() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mmi")],
        "qop",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])],
        [numpy_helper.from_array(np.ones((3, 2), np.uint8), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert is_prequantized(model)
    assert inspect_quantization(model).integer_ops == {"MatMulInteger": 1}


def test_prepare_model_builds_a_prequantized_model_as_it_is_without_a_table() -> None:
    model = _modelopt_style_conv()
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    reference = run(model, {"x": x}, optimize=False)["y"]
    prepared = prepare_model(model, BuildSpec(precision=Precision.INT8), None)
    assert prepared.quantization is not None
    assert prepared.quantization.scale_source == "prequantized: scales from the model"
    assert prepared.quantized_nodes == ["conv"]
    assert _qdq_nodes(prepared.model) == _qdq_nodes(model)
    np.testing.assert_array_equal(run(prepared.model, {"x": x}, optimize=False)["y"], reference)


def test_fp16_keeps_the_carried_qdq_intact() -> None:
    model = _modelopt_style_conv()
    converted, report = convert_fp16(model)
    onnx.checker.check_model(converted, full_check=True)
    assert _qdq_nodes(converted) == _qdq_nodes(model)  # same nodes, same scales, int8 weights
    assert initializer(converted, "w").dtype == np.int8
    for name in ("x_q", "x_dq", "w_dq"):
        assert report.fp32_nodes[name].startswith("Q/DQ keeps float32 scales")
    assert "conv" in report.fp16_nodes
    x = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    reference = run(model, {"x": x}, optimize=False)["y"]
    assert cosine_rows(reference, run(converted, {"x": x}, optimize=False)["y"]).min() > 0.999


def test_int8_fp16_of_a_prequantized_model_keeps_its_scales() -> None:
    model = _modelopt_style_conv()
    prepared = prepare_model(model, BuildSpec(precision=Precision.INT8_FP16), None)
    assert _qdq_nodes(prepared.model) == _qdq_nodes(model)
    assert prepared.fp16 is not None and "conv" in prepared.fp16.fp16_nodes


def test_smoothing_and_bias_correction_leave_a_prequantized_model_alone() -> None:
    from engines.graph.bias import correct_biases
    from engines.graph.layer_stats import LayerStats
    from engines.graph.smoothing import smooth

    model = _modelopt_style_conv()
    result = smooth(model, LayerStats())
    assert result.report.not_run.startswith("prequantized") and result.report.tensors == []
    assert _qdq_nodes(result.model) == _qdq_nodes(model)
    table = CalibrationTable(amax={"x": 1.0}, method=CalibrationMethod.MINMAX, samples=1)
    corrected, report = correct_biases(model, LayerStats(), table)
    assert report.not_run.startswith("prequantized") and report.layers == []
    np.testing.assert_array_equal(initializer(corrected, "b"), initializer(model, "b"))

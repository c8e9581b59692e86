from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.table import CalibrationTable
from engines.graph._onnx import GraphIndex
from engines.graph.fp16 import convert_fp16
from engines.graph.qdq import insert_qdq
from tests import zoo
from tests.unit.engines.graph.helpers import cosine_rows, nodes_by_name, producer, run


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    return GraphIndex.build(model).elem_type


def _io_types(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [
        (v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)
    ]


def test_tiny_cnn_runs_in_fp16_with_io_types_kept(tiny_eval_images: np.ndarray) -> None:
    model = zoo.tiny_cnn()
    converted, report = convert_fp16(model)
    onnx.checker.check_model(converted, full_check=True)
    assert _io_types(converted) == _io_types(model)
    assert report.fp32_nodes == {}
    assert report.fp16_nodes == [n.name for n in model.graph.node]
    types = _elem_types(converted)
    for tensor in ("c1", "r1", "res", "cat", "flat", "conv1.w", "fc.b"):
        assert types[tensor] == TensorProto.FLOAT16, tensor
    # Exactly two Casts: the input into FP16 and the output back to FP32 under its own name.
    casts = [n for n in converted.graph.node if n.op_type == "Cast"]
    assert report.casts_inserted == len(casts) == 2
    assert producer(converted, "logits").op_type == "Cast"  # type: ignore[union-attr]
    assert nodes_by_name(converted)["conv1"].input[0] == casts[0].output[0]
    feeds = {"image": tiny_eval_images}
    reference, got = run(model, feeds)["logits"], run(converted, feeds)["logits"]
    assert got.dtype == np.float32
    assert cosine_rows(reference, got).min() > 0.9999
    np.testing.assert_allclose(got, reference, atol=5e-3)


def test_keep_list_and_ranges_keep_nodes_fp32(
    tiny_table: CalibrationTable, tiny_eval_images: np.ndarray
) -> None:
    amax = dict(tiny_table.amax)
    amax["mp"] = 70000.0  # pretend MaxPool's output leaves the FP16 range
    table = CalibrationTable(amax=amax)
    model = zoo.tiny_cnn()
    converted, report = convert_fp16(model, table=table, keep=("conv2", "re:fl.*"))
    onnx.checker.check_model(converted, full_check=True)
    assert report.fp32_nodes["conv2"] == "kept by user"
    assert report.fp32_nodes["flatten"] == "kept by user"
    assert report.fp32_nodes["maxpool"].startswith("range: 'mp' reaches 7e+04")
    assert report.fp32_nodes["concat"].startswith("range: 'mp'")
    assert set(report.fp32_nodes) == {"conv2", "flatten", "maxpool", "concat"}
    types = _elem_types(converted)
    assert types["c2"] == types["mp"] == types["cat"] == TensorProto.FLOAT
    assert types["r1"] == types["c3"] == TensorProto.FLOAT16
    # conv2 reads r1 through one Cast back to FP32, and its FP32 weights are untouched.
    conv2 = nodes_by_name(converted)["conv2"]
    assert producer(converted, conv2.input[0]).op_type == "Cast"  # type: ignore[union-attr]
    assert types[conv2.input[1]] == TensorProto.FLOAT
    feeds = {"image": tiny_eval_images}
    assert cosine_rows(run(model, feeds)["logits"], run(converted, feeds)["logits"]).min() > 0.9999


def _layernorm_by_hand(scale: float) -> onnx.ModelProto:
    """x -> (x - mean) / sqrt(mean((x - mean)^2) + eps) * gamma, as older exporters write it."""
    gamma = np.linspace(0.5, 1.5, 16).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"], name="scale_up"),
        helper.make_node("ReduceMean", ["xs"], ["mean"], name="mean", axes=[-1]),
        helper.make_node("Sub", ["xs", "mean"], ["centered"], name="center"),
        helper.make_node("Pow", ["centered", "two"], ["squared"], name="square"),
        helper.make_node("ReduceMean", ["squared"], ["var"], name="variance", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
        helper.make_node("Div", ["centered", "std"], ["normed"], name="normalize"),
        helper.make_node("Mul", ["normed", "gamma"], ["y"], name="affine"),
    ]
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_variance_branch_of_a_hand_written_layernorm_stays_fp32() -> None:
    model = _layernorm_by_hand(1000.0)
    x = np.random.default_rng(0).normal(0, 1, (4, 16)).astype(np.float32)
    converted, report = convert_fp16(model)
    onnx.checker.check_model(converted, full_check=True)
    # Without ranges, x^2 may overflow: the power and the chain reading it stay FP32.
    assert set(report.fp32_nodes) == {"square", "variance", "add_eps", "std"}
    assert report.fp32_nodes["square"].startswith("x**2 may overflow FP16")
    assert {"scale_up", "mean", "center", "normalize", "affine"} <= set(report.fp16_nodes)
    reference, got = run(model, {"x": x})["y"], run(converted, {"x": x})["y"]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference, atol=1e-2)
    assert float(np.abs(x * 1000).max()) ** 2 > float(np.finfo(np.float16).max)  # x^2 overflows

    # With calibrated ranges showing small values, the whole LayerNorm runs in FP16.
    small = _layernorm_by_hand(1.0)
    from tests.unit.engines.graph.helpers import table_from_activations

    table = table_from_activations(small, {"x": x})
    converted, report = convert_fp16(small, table=table)
    assert report.fp32_nodes == {}
    np.testing.assert_allclose(run(converted, {"x": x})["y"], run(small, {"x": x})["y"], atol=1e-2)


def test_initializers_beyond_fp16_keep_their_node_fp32() -> None:
    big = np.array([1.0, 1e6], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "big"], ["m"], name="mul_big"),
            helper.make_node("Relu", ["m"], ["y"], name="relu"),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])],
        [numpy_helper.from_array(big, "big")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    converted, report = convert_fp16(model)
    onnx.checker.check_model(converted, full_check=True)
    assert report.fp32_nodes == {"mul_big": "range: 'big' reaches 1e+06 (> 65504)"}
    assert report.fp16_nodes == ["relu"]
    x = np.ones((3, 2), np.float32) * 1e-3
    np.testing.assert_allclose(run(converted, {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-3)


def test_qdq_model_gets_casts_after_dequantize(
    tiny_table: CalibrationTable, tiny_eval_images: np.ndarray
) -> None:
    quantized, _ = insert_qdq(zoo.tiny_cnn(), tiny_table)
    converted, report = convert_fp16(quantized, table=tiny_table)
    onnx.checker.check_model(converted, full_check=True)
    types = _elem_types(converted)
    qdq = [n for n in converted.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == 24
    for node in qdq:
        assert report.fp32_nodes[node.name].startswith("Q/DQ keeps float32 scales")
        assert types[node.input[1]] == TensorProto.FLOAT
    consumers = {
        t: [n for n in converted.graph.node if t in n.input] for n in qdq for t in n.output
    }
    for node in qdq:
        if node.op_type == "DequantizeLinear":
            assert {c.op_type for c in consumers[node.output[0]]} == {"Cast"}
    assert "conv1" in report.fp16_nodes and types["c1"] == TensorProto.FLOAT16
    feeds = {"image": tiny_eval_images}
    reference = run(quantized, feeds, optimize=False)["logits"]
    assert cosine_rows(reference, run(converted, feeds, optimize=False)["logits"]).min() > 0.999


@pytest.mark.slow
def test_minilm_fp16_embeddings_match_fp32(
    minilm: onnx.ModelProto, minilm_feeds: dict[str, np.ndarray], minilm_table: CalibrationTable
) -> None:
    reference = run(minilm, minilm_feeds)["embedding"]
    for table in (None, minilm_table):
        converted, report = convert_fp16(minilm, table=table)
        onnx.checker.check_model(converted, full_check=True)
        assert _io_types(converted) == _io_types(minilm)
        assert len(report.fp16_nodes) > 200
        # The attention mask's -3.4e38 fill stays FP32; LayerNorm and MatMuls go FP16.
        assert report.fp32_nodes["/bert/Where_1"].startswith("range:")
        types = _elem_types(converted)
        for node in converted.graph.node:
            if node.op_type in ("LayerNormalization", "MatMul"):
                assert types[node.output[0]] == TensorProto.FLOAT16, node.name
        got = run(converted, minilm_feeds)["embedding"]
        assert cosine_rows(reference, got).min() >= 0.999
    # With a table, the masked scores (amax 3.4e38) keep the Softmax inputs in FP32.
    softmax = [n for n in report.fp32_nodes if n.endswith("Softmax")]
    assert len(softmax) == 6


@pytest.mark.slow
def test_efficientnet_fp16(
    efficientnet: onnx.ModelProto, efficientnet_eval_images: np.ndarray
) -> None:
    converted, report = convert_fp16(efficientnet)
    onnx.checker.check_model(converted, full_check=True)
    assert _io_types(converted) == _io_types(efficientnet)
    types = _elem_types(converted)
    assert all(
        types[n.output[0]] == TensorProto.FLOAT16
        for n in converted.graph.node
        if n.op_type == "Conv"
    )
    feeds = {"input": efficientnet_eval_images}
    reference, got = run(efficientnet, feeds)["logits"], run(converted, feeds)["logits"]
    assert cosine_rows(reference, got).min() > 0.999
    assert (reference.argmax(1) == got.argmax(1)).all()
    assert report.fp32_nodes == {}


def test_range_and_scalar_epsilons_stay_fp32() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="range"),
            helper.make_node("Add", ["x", "r"], ["s"], name="add"),
            helper.make_node("Max", ["s", "tiny"], ["y"], name="clamp"),
        ],
        "range",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3000]),
            helper.make_tensor_value_info("limit", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array(0.0, np.float32), "start"),
            numpy_helper.from_array(np.array(1.0, np.float32), "delta"),
            numpy_helper.from_array(np.array(1e-9, np.float32), "tiny"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    converted, report = convert_fp16(model)
    onnx.checker.check_model(converted, full_check=True)
    assert report.fp32_nodes == {
        "range": "Range's length depends on exact arithmetic",
        "clamp": "range: constant 'tiny' = 1e-09 underflows to 0 in FP16",
    }
    assert report.fp16_nodes == ["add"]
    feeds = {"x": np.zeros(3000, np.float32), "limit": np.array(3000.0, np.float32)}
    got = run(converted, feeds)["y"]
    assert got.shape == (3000,)  # an FP16 Range would lose elements above 2048
    assert got[0] == pytest.approx(1e-9)

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.table import CalibrationTable
from core.errors import ModelError
from engines.graph.qdq import insert_qdq
from tests import zoo
from tests.unit.engines.graph.helpers import (
    attribute,
    cosine_rows,
    dequantized_source,
    initializer,
    nodes_by_name,
    producer,
    run,
    table_from_activations,
)


def _assert_symmetric_int8(model: onnx.ModelProto) -> None:
    """Every Q/DQ: explicit axis, float32 scale > 0, int8 zero point of 0 shaped like the scale."""
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        assert any(a.name == "axis" for a in node.attribute), node.name
        assert len(node.input) == 3, node.name
        scale = next(t for t in model.graph.initializer if t.name == node.input[1])
        zero = next(t for t in model.graph.initializer if t.name == node.input[2])
        assert scale.data_type == TensorProto.FLOAT
        assert zero.data_type == TensorProto.INT8
        s, z = numpy_helper.to_array(scale), numpy_helper.to_array(zero)
        assert s.shape == z.shape and s.ndim <= 1
        assert np.all(s > 0) and np.all(np.isfinite(s))
        assert not np.any(z)


def _weight_pair(
    model: onnx.ModelProto, node: onnx.NodeProto, slot: int
) -> tuple[str, int, np.ndarray]:
    source = dequantized_source(model, node.input[slot])
    assert source is not None, f"{node.name} input {slot} is not dequantized"
    weight, q, dq = source
    assert attribute(q, "axis") == attribute(dq, "axis")
    assert q.input[1] == dq.input[1]
    axis = attribute(q, "axis")
    assert isinstance(axis, int)
    return weight, axis, initializer(model, q.input[1])


def _scale_of(model: onnx.ModelProto, tensor: str) -> float:
    source = dequantized_source(model, tensor)
    assert source is not None
    return float(initializer(model, source[1].input[1]))


def test_tiny_cnn_placement_follows_tensorrt_rules(tiny_table: CalibrationTable) -> None:
    model, report = insert_qdq(zoo.tiny_cnn(), tiny_table)
    onnx.checker.check_model(model, full_check=True)
    _assert_symmetric_int8(model)
    nodes = nodes_by_name(model)

    # Conv/Gemm: activation per tensor with the table's scale, weights per output channel.
    for name, activation, weight_name in (
        ("conv1", "image", "conv1.w"),
        ("conv2", "r1", "conv2.w"),
        ("conv3", "cat", "conv3.w"),
        ("fc", "flat", "fc.w"),
    ):
        node = nodes[name]
        source = dequantized_source(model, node.input[0])
        assert source is not None and source[0] == activation
        assert attribute(source[1], "axis") == attribute(source[2], "axis") == 0
        if activation != "cat":  # cat shares the Concat group's scale, checked below
            assert _scale_of(model, node.input[0]) == tiny_table.scale(activation)
        weight, axis, scale = _weight_pair(model, node, 1)
        assert (weight, axis) == (weight_name, 0)
        values = initializer(model, weight_name)
        expected = np.abs(values.reshape(values.shape[0], -1)).max(1) / 127
        np.testing.assert_allclose(scale, expected.astype(np.float32), rtol=1e-6)
    assert (
        nodes["conv1"].input[2] == "conv1.b" and nodes["fc"].input[2] == "fc.b"
    )  # bias stays FP32

    # Residual Add: the conv2 output (fused by TensorRT) stays raw, the skip input is quantized
    # once, sharing the pair conv2 already reads.
    add = nodes["residual_add"]
    assert add.input[0] == "c2"
    assert add.input[1] == nodes["conv2"].input[0]
    assert dequantized_source(model, add.input[1])[0] == "r1"  # type: ignore[index]

    # AveragePool input quantized, MaxPool not; Concat inputs and output share one scale.
    assert dequantized_source(model, nodes["avgpool"].input[0])[0] == "r2"  # type: ignore[index]
    assert nodes["maxpool"].input[0] == "r2"
    cat = nodes["concat"]
    shared = max(tiny_table.amax[t] for t in ("ap", "mp", "cat"))
    scales = {_scale_of(model, t) for t in (*cat.input, nodes["conv3"].input[0])}
    assert scales == {float(np.float32(shared / 127))}
    assert dequantized_source(model, nodes["gap"].input[0])[0] == "c3"  # type: ignore[index]

    # Each tensor is quantized once; outputs of quantized ops are never quantized for their own sake.
    quantized = Counter(n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert set(quantized.values()) == {1}
    assert set(quantized) == {
        "image",
        "conv1.w",
        "r1",
        "conv2.w",
        "r2",
        "ap",
        "mp",
        "cat",
        "conv3.w",
        "c3",
        "flat",
        "fc.w",
    }
    assert report.quantized_nodes == [
        "conv1",
        "conv2",
        "residual_add",
        "avgpool",
        "concat",
        "conv3",
        "gap",
        "fc",
    ]
    assert report.skipped == {
        "maxpool": "excluded by rule: MaxPool is not quantized (Q/DQ move across it)"
    }
    assert report.qdq_pairs == 12 and report.opset == 17
    assert report.quantized_tensors["conv2"] == ["r1", "conv2.w"]
    assert report.quantized_tensors["residual_add"] == ["r1"]
    assert report.quantized_tensors["concat"] == ["ap", "mp"]
    assert report.quantized_tensors["fc"] == ["flat", "fc.w"]


def test_tiny_cnn_int8_stays_close_on_real_images(
    tiny_table: CalibrationTable, tiny_eval_images: np.ndarray
) -> None:
    model = zoo.tiny_cnn()
    quantized, _ = insert_qdq(model, tiny_table)
    feeds = {"image": tiny_eval_images}
    reference = run(model, feeds)["logits"]
    emulated = run(quantized, feeds, optimize=False)["logits"]
    cosine = cosine_rows(reference, emulated)
    assert cosine.min() > 0.99 and cosine.mean() > 0.999
    optimized = run(quantized, feeds)["logits"]  # ONNX Runtime's own INT8 kernels also load it
    assert optimized.shape == reference.shape and np.all(np.isfinite(optimized))


def test_small_cnn_int8_keeps_its_clear_predictions() -> None:
    model = zoo.small_cnn()
    table = table_from_activations(model, {"image": zoo.small_images(256, seed=1)})
    quantized, report = insert_qdq(model, table)
    assert Counter(n.op_type for n in model.graph.node if n.name in report.quantized_nodes) == {
        "Conv": 2,
        "Gemm": 2,
    }
    for gemm in (n for n in quantized.graph.node if n.op_type == "Gemm"):
        _, axis, scale = _weight_pair(quantized, gemm, 1)
        assert axis == (0 if attribute(gemm, "transB") == 1 else 1) and scale.ndim == 1
    feeds = {"image": zoo.small_images(500, seed=2)}
    reference = run(model, feeds)["logits"]
    emulated = run(quantized, feeds, optimize=False)["logits"]
    assert cosine_rows(reference, emulated).mean() > 0.995
    agree = reference.argmax(1) == emulated.argmax(1)
    assert agree.mean() >= 0.95
    # An untrained net has many near ties; where FP32 is clear about the top class, INT8 agrees.
    top2 = np.sort(reference, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.2
    assert clear.sum() > 100 and agree[clear].all()


def _gemm_model(trans_b: int) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (10, 8) if trans_b else (8, 10)).astype(np.float32)
    w[0 if trans_b else (slice(None), 0)] = 0.0  # an all-zero output channel
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=trans_b)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("trans_b", "axis"), [(1, 0), (0, 1)])
def test_gemm_weight_axis_follows_trans_b(trans_b: int, axis: int) -> None:
    model = _gemm_model(trans_b)
    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    table = table_from_activations(model, {"x": x})
    quantized, _ = insert_qdq(model, table)
    onnx.checker.check_model(quantized, full_check=True)
    _assert_symmetric_int8(quantized)
    weight, got_axis, scale = _weight_pair(quantized, nodes_by_name(quantized)["gemm"], 1)
    assert (weight, got_axis, scale.shape) == ("w", axis, (10,))
    assert scale[0] > 0  # the zero channel still gets a positive scale
    reference = run(model, {"x": x})["y"]
    emulated = run(quantized, {"x": x}, optimize=False)["y"]
    assert cosine_rows(reference, emulated).min() > 0.999


def test_conv_transpose_weights_are_quantized_on_axis_1() -> None:
    w = np.random.default_rng(1).normal(0, 0.3, (4, 6, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", strides=[2, 2])],
        "deconv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(2).normal(size=(1, 4, 5, 5)).astype(np.float32)
    quantized, report = insert_qdq(model, table_from_activations(model, {"x": x}))
    onnx.checker.check_model(quantized, full_check=True)
    weight, axis, scale = _weight_pair(quantized, nodes_by_name(quantized)["deconv"], 1)
    assert (weight, axis, scale.shape) == ("w", 1, (6,))
    np.testing.assert_allclose(scale, np.abs(w).max(axis=(0, 2, 3)) / 127, rtol=1e-6)
    assert report.quantized_nodes == ["deconv"]
    assert (
        cosine_rows(run(model, {"x": x})["y"], run(quantized, {"x": x}, optimize=False)["y"]).min()
        > 0.999
    )


@pytest.mark.parametrize(("fill", "hoisted"), [(0.0, True), (1.0, False)])
def test_pairs_move_above_a_zero_pad_feeding_a_conv(fill: float, hoisted: bool) -> None:
    w = np.random.default_rng(5).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Pad", ["r", "pads", "fill"], ["p"], name="pad"),
            helper.make_node("Conv", ["p", "w"], ["y"], name="conv"),
        ],
        "pad_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
            numpy_helper.from_array(np.array(fill, np.float32), "fill"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(6).normal(size=(2, 3, 8, 8)).astype(np.float32)
    quantized, report = insert_qdq(model, table_from_activations(model, {"x": x}))
    onnx.checker.check_model(quantized, full_check=True)
    nodes = nodes_by_name(quantized)
    assert report.quantized_nodes == ["conv"]
    above, below = (
        dequantized_source(quantized, nodes["pad"].input[0]),
        dequantized_source(quantized, nodes["conv"].input[0]),
    )
    assert (above is not None, below is not None) == (hoisted, not hoisted)
    assert report.quantized_tensors["conv"] == ["r" if hoisted else "p", "w"]
    reference = run(model, {"x": x})["y"]
    assert cosine_rows(reference, run(quantized, {"x": x}, optimize=False)["y"]).min() > 0.999


def _matmul_model(rows: int | str) -> onnx.ModelProto:
    w = np.random.default_rng(4).normal(0, 0.5, (8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "proj",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_matmul_constant_b_is_quantized_per_column_and_gemv_is_left_out() -> None:
    model = _matmul_model("m")
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    table = table_from_activations(model, {"x": x})
    quantized, report = insert_qdq(model, table)
    weight, axis, scale = _weight_pair(quantized, nodes_by_name(quantized)["proj"], 1)
    assert (weight, axis, scale.shape) == ("w", 1, (4,))
    assert report.quantized_nodes == ["proj"]

    gemv = _matmul_model(1)
    unchanged, report = insert_qdq(gemv, table)
    assert report.skipped == {"proj": "excluded by rule: GEMV-shaped MatMul (M or N is 1)"}
    assert not any(n.op_type == "QuantizeLinear" for n in unchanged.graph.node)
    forced, report = insert_qdq(gemv, table, quantize_attention=True)
    assert report.quantized_nodes == ["proj"]
    onnx.checker.check_model(forced, full_check=True)


def test_keep_patterns_leave_nodes_unquantized(tiny_table: CalibrationTable) -> None:
    model, report = insert_qdq(zoo.tiny_cnn(), tiny_table, keep=("conv2", "Gemm", "re:ga."))
    nodes = nodes_by_name(model)
    assert nodes["conv2"].input[:2] == ["r1", "conv2.w"]
    assert nodes["fc"].input[:2] == ["flat", "fc.w"]
    assert nodes["gap"].input[0] == "c3"
    assert (
        report.skipped["conv2"] == report.skipped["fc"] == report.skipped["gap"] == "kept by user"
    )
    # The residual Add has no quantized Conv left to fuse into.
    assert nodes["residual_add"].input[:] == ["c2", "r1"]
    assert report.skipped["residual_add"].startswith("excluded by rule: residual Add")
    assert "conv1" in report.quantized_nodes and "conv3" in report.quantized_nodes
    onnx.checker.check_model(model, full_check=True)


def test_tensors_without_a_usable_range_are_reported(tiny_table: CalibrationTable) -> None:
    amax = dict(tiny_table.amax)
    del amax["flat"]
    amax["r2"] = 0.0
    table = CalibrationTable(amax=amax)
    model, report = insert_qdq(zoo.tiny_cnn(), table)
    assert report.skipped["fc"].startswith("no range: tensor 'flat'")
    assert report.skipped["avgpool"].startswith("no range: tensor 'r2'")
    nodes = nodes_by_name(model)
    assert nodes["fc"].input[:2] == ["flat", "fc.w"]  # no half-quantized Gemm
    assert nodes["avgpool"].input[0] == "r2"
    onnx.checker.check_model(model, full_check=True)


def test_constant_node_weights_are_folded_and_quantized(tiny_table: CalibrationTable) -> None:
    model, report = insert_qdq(zoo.tiny_cnn(constants_as_nodes=True), tiny_table)
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    weight, axis, scale = _weight_pair(model, nodes_by_name(model)["conv2"], 1)
    assert (weight, axis, scale.shape) == ("conv2.w", 0, (8,))
    assert len(report.quantized_nodes) == 8
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opsets_are_raised_to_13(
    opset: int, tiny_table: CalibrationTable, tiny_eval_images: np.ndarray
) -> None:
    old = zoo.tiny_cnn()
    old.opset_import[0].version = opset
    old.ir_version = 6
    onnx.checker.check_model(old, full_check=True)
    model, report = insert_qdq(old, tiny_table)
    assert report.opset == 13 and model.ir_version >= 7
    onnx.checker.check_model(model, full_check=True)
    _assert_symmetric_int8(model)
    feeds = {"image": tiny_eval_images}
    current, _ = insert_qdq(zoo.tiny_cnn(), tiny_table)  # the same graph at opset 17
    np.testing.assert_allclose(
        run(model, feeds, optimize=False)["logits"],
        run(current, feeds, optimize=False)["logits"],
        atol=1e-6,
    )


def test_an_already_quantized_model_is_left_as_it_is(tiny_table: CalibrationTable) -> None:
    once, first = insert_qdq(zoo.tiny_cnn(), tiny_table)
    twice, report = insert_qdq(once, None)  # no table needed: the scales come from the model
    assert twice.graph == once.graph
    assert report.scale_source == "prequantized: scales from the model"
    assert report.quantized_nodes == first.quantized_nodes and report.skipped == {}
    assert report.qdq_pairs == 0 and report.prequantized is not None
    again, _ = insert_qdq(once, tiny_table)  # a table is ignored, nothing quantized twice
    assert Counter(n.op_type for n in again.graph.node)["QuantizeLinear"] == 12


def _conv_with_denormal_channel() -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.2, (4, 3, 1, 1)).astype(np.float32)
    w[2] = np.float32(3.2e-40)  # a denormal channel, as in a real detector's 1x1 Conv
    w[2, 1] = -np.float32(1e-41)
    bias = np.array([0.1, -0.2, 0.3, 0.05], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        "denormal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, w


def test_a_denormal_weight_channel_gets_the_floor_scale_and_exact_zeros() -> None:
    model, w = _conv_with_denormal_channel()
    x = np.random.default_rng(4).normal(size=(2, 3, 4, 4)).astype(np.float32)
    quantized, report = insert_qdq(model, table_from_activations(model, {"x": x}))
    onnx.checker.check_model(quantized, full_check=True)
    _assert_symmetric_int8(quantized)
    weight, axis, scale = _weight_pair(quantized, nodes_by_name(quantized)["conv"], 1)
    assert (weight, axis) == ("w", 0)
    assert scale[2] == np.float32(2.0**-14)  # float16's smallest normal, not a denormal
    assert np.isfinite(scale.astype(np.float16)).all() and (scale.astype(np.float16) > 0).all()
    np.testing.assert_allclose(scale[[0, 1, 3]], np.abs(w[[0, 1, 3]]).max(axis=(1, 2, 3)) / 127)
    stored = initializer(quantized, "w")
    assert not np.any(stored[2]) and np.array_equal(stored[[0, 1, 3]], w[[0, 1, 3]])
    assert report.zeroed_weight_channels == {"w": 1}
    y = run(quantized, {"x": x}, optimize=False)["y"]
    assert np.all(y[:, 2] == np.float32(0.3))  # the bias alone, exactly
    assert cosine_rows(run(model, {"x": x})["y"], y).min() > 0.999


def test_integer_inputs_and_embeddings_are_left_alone() -> None:
    model = zoo.tiny_two_input()
    feeds = {
        "x": np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32),
        "ids": np.array([[1, 2, 3]] * 4, dtype=np.int64),
    }
    quantized, report = insert_qdq(model, table_from_activations(model, feeds))
    assert report.quantized_nodes == ["proj"]
    assert nodes_by_name(quantized)["embed"].input[:] == ["table", "ids"]
    assert report.skipped == {
        "add": "excluded by rule: residual Add with no quantized Conv to fuse into"
    }
    onnx.checker.check_model(quantized, full_check=True)


@pytest.mark.slow
def test_efficientnet_lite0_int8(
    efficientnet: onnx.ModelProto,
    efficientnet_table: CalibrationTable,
    efficientnet_eval_images: np.ndarray,
) -> None:
    model, report = insert_qdq(efficientnet, efficientnet_table)
    onnx.checker.check_model(model, full_check=True)
    _assert_symmetric_int8(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 49
    hoisted = 0
    for conv in convs:
        activation = conv.input[0]
        pad = producer(model, activation)
        if pad is not None and pad.op_type == "Pad":  # the pair sits above the zero Pad
            assert dequantized_source(model, activation) is None
            activation, hoisted = pad.input[0], hoisted + 1
        assert dequantized_source(model, activation) is not None
        _, axis, scale = _weight_pair(model, conv, 1)
        assert (
            axis == 0
            and scale.shape[0]
            == initializer(model, dequantized_source(model, conv.input[1])[0]).shape[0]
        )  # type: ignore[index]
    assert hoisted == 17
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 9
    for add in adds:
        raw = [t for t in add.input if dequantized_source(model, t) is None]
        assert len(raw) == 1 and producer(model, raw[0]).op_type == "Conv"  # type: ignore[union-attr]
    assert Counter(n.op_type for n in model.graph.node if n.name in report.quantized_nodes) == {
        "Conv": 49,
        "Add": 9,
        "GlobalAveragePool": 1,
        "Gemm": 1,
    }
    # The shape-computing int64 Concats are not touched.
    assert report.skipped == {}
    feeds = {"input": efficientnet_eval_images}
    reference = run(efficientnet, feeds)["logits"]
    emulated = run(model, feeds, optimize=False)["logits"]
    cosine = cosine_rows(reference, emulated)
    assert cosine.mean() > 0.98 and cosine.min() > 0.9
    assert (reference.argmax(1) == emulated.argmax(1)).mean() >= 0.75


@pytest.mark.slow
def test_minilm_int8_leaves_attention_and_normalization_in_high_precision(
    minilm: onnx.ModelProto, minilm_table: CalibrationTable
) -> None:
    model, report = insert_qdq(minilm, minilm_table)
    onnx.checker.check_model(model, full_check=True)
    _assert_symmetric_int8(model)
    reasons = Counter(report.skipped.values())
    assert reasons["excluded by rule: attention core (MatMul around Softmax)"] == 12
    assert reasons["excluded by rule: LayerNormalization stays high precision"] == 13
    assert reasons["excluded by rule: GELU stays high precision"] == 6
    quantized = [n for n in model.graph.node if n.name in report.quantized_nodes]
    assert len(quantized) == 36 and {n.op_type for n in quantized} == {"MatMul"}
    for node in quantized:
        assert dequantized_source(model, node.input[0]) is not None
        _, axis, scale = _weight_pair(model, node, 1)
        assert axis == 1 and scale.ndim == 1
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf") or node.name.endswith(
            "self/MatMul"
        ):
            assert all(dequantized_source(model, t) is None for t in node.input), node.name
    feeds = zoo.minilm_inputs(zoo.SENTENCES[16:])
    reference = run(minilm, feeds)["embedding"]
    assert cosine_rows(reference, run(model, feeds, optimize=False)["embedding"]).min() > 0.95
    assert cosine_rows(reference, run(model, feeds)["embedding"]).min() > 0.95

    everything, report = insert_qdq(minilm, minilm_table, quantize_attention=True)
    onnx.checker.check_model(everything, full_check=True)
    assert len(report.quantized_nodes) == 36 + 12 + 13 + 6
    core = nodes_by_name(everything)["/bert/encoder/layer.0/attention/self/MatMul"]
    assert all(dequantized_source(everything, t) is not None for t in core.input)


def test_an_invalid_input_model_is_blamed_not_the_pass(tiny_table: CalibrationTable) -> None:
    model = zoo.tiny_cnn()
    model.graph.node.append(helper.make_node("Relu", ["nowhere"], ["dangling"], name="broken"))
    with pytest.raises(ModelError, match="does not pass the ONNX checker"):
        insert_qdq(model, tiny_table)

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.data import CalibrationDataset
from engines.graph import prepare_model
from engines.graph.bias import sqnr_db
from engines.graph.layer_stats import LayerStats, collect_layer_stats
from engines.graph.qdq import insert_qdq
from engines.graph.smoothing import smooth
from engines.spec import BuildSpec, Precision, TechniqueMode
from tests.unit.engines.graph.helpers import nodes_by_name, run, table_from_activations

WIDE = (1, 5)  # channels an order of magnitude wider than the rest


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], shape: list[object]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "smooth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _conv_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    w1 = rng.normal(0, 0.2, (8, 3, 3, 3))
    w1[list(WIDE)] *= 15.0  # conv1 makes a few wide channels
    return {
        "w1": w1,
        "b1": rng.normal(0, 0.05, 8),
        "w2": rng.normal(0, 0.3, (6, 8, 1, 1)),
        "b2": rng.normal(0, 0.05, 6),
    }


def _conv_relu_conv(middle: str = "Relu") -> onnx.ModelProto:
    inits = _conv_weights(np.random.default_rng(0))
    if middle == "Relu":
        act = helper.make_node("Relu", ["c1"], ["a"], name="act")
    else:  # ReLU6, which does not commute with a scale
        inits.update({"lo": np.array(0.0), "hi": np.array(6.0)})
        act = helper.make_node("Clip", ["c1", "lo", "hi"], ["a"], name="act")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        act,
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2"),
    ]
    return _model(nodes, inits, ["n", 3, 8, 8])


def _images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 2.0, (count, 3, 8, 8)).astype(np.float32)


def _stats(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path) -> LayerStats:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return collect_layer_stats(path, CalibrationDataset.from_arrays(feeds), max_rows=128)


def _int8_sqnr(model: onnx.ModelProto, calib: dict[str, np.ndarray], held_out: dict[str, np.ndarray], reference: np.ndarray) -> float:
    quantized, _ = insert_qdq(model, table_from_activations(model, calib))
    return sqnr_db(reference, run(quantized, held_out, optimize=False)["y"])


def test_conv_relu_conv_folds_into_the_first_conv_and_lowers_the_int8_error(tmp_path: Path) -> None:
    model = _conv_relu_conv()
    calib, held_out = {"x": _images(32, 1)}, {"x": _images(16, 2)}
    stats = _stats(model, calib, tmp_path)
    result = smooth(model, stats, min_gain_with_mul=1.0)  # exact folds only
    onnx.checker.check_model(result.model, full_check=True)
    (record,) = [t for t in result.report.tensors if t.tensor == "a"]
    assert record.applied and record.folded_into == "Conv conv1" and not record.inserted_mul
    assert record.alpha is not None and 0.3 <= record.alpha <= 0.9
    assert record.sqnr_after_db is not None and record.sqnr_before_db is not None
    assert record.sqnr_after_db > record.sqnr_before_db + 1.0
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu", "Conv"]  # plain graph
    reference = run(model, held_out)["y"]
    np.testing.assert_allclose(run(result.model, held_out)["y"], reference, rtol=1e-4, atol=1e-4)
    before = _int8_sqnr(model, calib, held_out, reference)
    after = _int8_sqnr(result.model, calib, held_out, reference)
    assert after > before + 1.0, (before, after)
    # The statistics follow the smoothing: conv2's input channels were divided by s.
    old, new = stats.inputs["conv2"], result.stats.inputs["conv2"]
    scales = old.absmax / new.absmax
    assert np.ptp(new.absmax) < np.ptp(old.absmax) and np.all(scales > 0)
    np.testing.assert_allclose(new.rows, old.rows / scales.astype(np.float32)[None, :, None], rtol=1e-5)


def test_relu6_stops_the_fold_and_a_mul_is_inserted_only_when_asked(tmp_path: Path) -> None:
    model = _conv_relu_conv("Clip")
    calib, held_out = {"x": _images(32, 1)}, {"x": _images(16, 2)}
    stats = _stats(model, calib, tmp_path)
    auto = smooth(model, stats, min_gain_with_mul=10.0)  # no Mul is worth that
    (record,) = [t for t in auto.report.tensors if t.tensor == "a"]
    assert not record.applied and "asked" in record.reason
    assert [n.op_type for n in auto.model.graph.node] == ["Conv", "Clip", "Conv"]
    forced = smooth(model, stats, mode=TechniqueMode.ON, keep=("conv1",))
    (record,) = forced.report.tensors
    assert record.applied and record.inserted_mul and record.folded_into is not None
    assert [n.op_type for n in forced.model.graph.node] == ["Conv", "Clip", "Mul", "Conv"]
    reference = run(model, held_out)["y"]
    np.testing.assert_allclose(run(forced.model, held_out)["y"], reference, rtol=1e-4, atol=1e-4)
    mul = next(n for n in forced.model.graph.node if n.op_type == "Mul")
    assert nodes_by_name(forced.model)["conv2"].input[0] == mul.output[0]
    assert forced.stats.inputs["conv2"].layer.activation == mul.output[0]


def _learnable_affine() -> onnx.ModelProto:
    """PP-LCNetV3's activation tail: HardSwish, then y = a * x + b with scalar a, b."""
    inits = _conv_weights(np.random.default_rng(3))
    inits.update({"a": np.array([1.3]), "b": np.array([0.1])})
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h"], name="hswish"),
        helper.make_node("Mul", ["h", "a"], ["m"], name="lab_scale"),
        helper.make_node("Add", ["m", "b"], ["a_out"], name="lab_bias"),
        helper.make_node("Conv", ["a_out", "w2", "b2"], ["y"], name="conv2"),
    ]
    return _model(nodes, inits, ["n", 3, 8, 8])


def test_scalar_affine_constants_become_per_channel_vectors(tmp_path: Path) -> None:
    model = _learnable_affine()
    calib, held_out = {"x": _images(32, 1)}, {"x": _images(16, 2)}
    result = smooth(model, _stats(model, calib, tmp_path), mode=TechniqueMode.ON)
    onnx.checker.check_model(result.model, full_check=True)
    (record,) = [t for t in result.report.tensors if t.tensor == "a_out"]
    assert record.folded_into == "Mul lab_scale"
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert inits["a"].shape == inits["b"].shape == (8, 1, 1)
    reference = run(model, held_out)["y"]
    np.testing.assert_allclose(run(result.model, held_out)["y"], reference, rtol=1e-4, atol=1e-4)


def _layer_norm_qkv(residual: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    gamma = np.ones(16)
    gamma[[2, 11]] = 12.0  # outlier channels, as in transformer hidden states
    inits = {"gamma": gamma, "beta": rng.normal(0, 0.1, 16)}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln")]
    outs = []
    for name in ("q", "k", "v"):
        inits[f"{name}.w"] = rng.normal(0, 0.2, (16, 16))
        inits[f"{name}.b"] = rng.normal(0, 0.1, 16)
        nodes += [
            helper.make_node("MatMul", ["h", f"{name}.w"], [f"{name}_mm"], name=name),
            helper.make_node("Add", [f"{name}_mm", f"{name}.b"], [name], name=f"{name}_bias"),
        ]
        outs.append(name)
    nodes.append(helper.make_node("Sum", outs, ["s"], name="sum"))
    if residual:
        nodes.append(helper.make_node("Add", ["s", "h"], ["y"], name="residual"))
    else:
        nodes.append(helper.make_node("Identity", ["s"], ["y"], name="out"))
    model = _model(nodes, inits, ["n", 10, 16])
    return model


@pytest.mark.parametrize(("residual", "where"), [(False, "LayerNormalization ln"), (True, "Mul")])
def test_qkv_share_one_smoothing_folded_into_layer_norm_or_a_mul(
    residual: bool, where: str, tmp_path: Path
) -> None:
    model = _layer_norm_qkv(residual)
    rng = np.random.default_rng(5)
    calib = {"x": rng.normal(size=(24, 10, 16)).astype(np.float32)}
    held_out = {"x": rng.normal(size=(8, 10, 16)).astype(np.float32)}
    result = smooth(model, _stats(model, calib, tmp_path), mode=TechniqueMode.ON)
    onnx.checker.check_model(result.model, full_check=True)
    (record,) = result.report.tensors
    assert record.layers == ["q", "k", "v"] and record.applied
    assert record.folded_into is not None and record.folded_into.startswith(where)
    assert record.inserted_mul == residual
    reference = run(model, held_out)["y"]
    np.testing.assert_allclose(run(result.model, held_out)["y"], reference, rtol=1e-4, atol=1e-4)
    assert record.sqnr_after_db is not None and record.sqnr_before_db is not None
    assert record.sqnr_after_db > record.sqnr_before_db


def test_off_changes_nothing_and_auto_applies_where_the_gain_is_enough(tmp_path: Path) -> None:
    model = _conv_relu_conv("Clip")
    stats = _stats(model, {"x": _images(16, 1)}, tmp_path)
    off = smooth(model, stats, mode=TechniqueMode.OFF)
    assert off.report.tensors == [] and off.stats is stats
    assert [t.name for t in off.model.graph.initializer] == ["w1", "b1", "w2", "b2", "lo", "hi"]
    for min_gain in (0.0, 0.5, 0.99):
        auto = smooth(model, stats, min_gain_with_mul=min_gain)
        assert [t.tensor for t in auto.report.tensors] == ["x", "a"]
        for record in auto.report.tensors:
            assert record.sqnr_before_db is not None and record.sqnr_after_db is not None
            gain = 1.0 - 10 ** (-(record.sqnr_after_db - record.sqnr_before_db) / 10)
            assert record.applied == (gain >= min_gain), record
            assert record.applied == (record.folded_into is not None)
    kept = smooth(model, stats, keep=("conv2",))
    assert kept.report.skipped == {"conv2": "kept by user"}


def test_a_smoothed_model_builds_int8_fp16(tmp_path: Path) -> None:
    model = _layer_norm_qkv(residual=True)
    rng = np.random.default_rng(6)
    calib = {"x": rng.normal(size=(24, 10, 16)).astype(np.float32)}
    result = smooth(model, _stats(model, calib, tmp_path), mode=TechniqueMode.ON)
    table = table_from_activations(result.model, calib)
    prepared = prepare_model(result.model, BuildSpec(precision=Precision.INT8_FP16), table)
    onnx.checker.check_model(prepared.model, full_check=True)
    assert set(prepared.quantized_nodes) >= {"q", "k", "v"}
    (mul,) = [n for n in result.model.graph.node if n.op_type == "Mul"]
    for name in ("q", "k", "v"):  # each quantized layer reads the Mul's output through Q/DQ
        assert nodes_by_name(prepared.model)[name].input[0] != mul.output[0]
    reference = run(model, calib)["y"]
    out = run(prepared.model, calib, optimize=False)["y"]
    assert sqnr_db(reference, out) > 25.0

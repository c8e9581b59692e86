from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from core.errors import ModelError
from engines.graph.inspect import inspect_model, load_model, normalize
from tests import zoo
from tests.unit.engines.graph.helpers import run


def test_inspect_tiny_cnn() -> None:
    info = inspect_model(zoo.tiny_cnn())
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [
        ("image", "float32", ("batch", 3, 16, 16))
    ]
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [
        ("logits", "float32", ("batch", 10))
    ]
    assert info.inputs[0].dynamic
    assert (info.opset, info.ir_version, info.num_nodes) == (17, 8, 12)
    assert info.opset_imports == {"ai.onnx": 17}
    assert info.op_census == {
        "Conv": 3,
        "Relu": 2,
        "Add": 1,
        "AveragePool": 1,
        "MaxPool": 1,
        "Concat": 1,
        "GlobalAveragePool": 1,
        "Flatten": 1,
        "Gemm": 1,
    }
    assert info.node_names[:3] == ("conv1", "relu1", "conv2")
    assert info.dynamic_dims == {"image": ["batch"], "logits": ["batch"]}
    assert not info.weights_in_constants
    assert info.parameter_count == 8 * 27 + 8 + 8 * 72 + 8 + 8 * 16 + 80 + 10
    fixed = inspect_model(zoo.tiny_cnn(batch=1))
    assert fixed.dynamic_dims == {} and not fixed.inputs[0].dynamic


def test_integer_inputs_and_unnamed_dims() -> None:
    info = inspect_model(zoo.tiny_two_input())
    assert [(t.name, t.dtype) for t in info.inputs] == [("x", "float32"), ("ids", "int64")]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    info = inspect_model(helper.make_model(graph))
    assert info.inputs[0].shape == (None, 4)
    assert info.outputs[0].shape is None
    assert info.dynamic_dims == {"x": ["?"], "y": ["?"]}


def test_normalize_folds_constant_weights_and_names_nodes(tiny_eval_images: np.ndarray) -> None:
    model = zoo.tiny_cnn(constants_as_nodes=True)
    assert inspect_model(model).weights_in_constants
    model.graph.node[-1].name = ""  # an unnamed Gemm
    normalized = normalize(model)
    info = inspect_model(normalized)
    assert not info.weights_in_constants and "Constant" not in info.op_census
    assert {t.name for t in normalized.graph.initializer} >= {"conv1.w", "conv2.w", "fc.w", "fc.b"}
    assert normalized.graph.node[-1].name == "Gemm_11"  # its index once the Constants are gone
    assert len(set(info.node_names)) == info.num_nodes
    # Shape inference recorded every intermediate tensor's type and shape.
    inferred = {v.name: v for v in normalized.graph.value_info}
    assert inferred["cat"].type.tensor_type.shape.dim[1].dim_value == 16
    onnx.checker.check_model(normalized, full_check=True)
    feeds = {"image": tiny_eval_images}
    np.testing.assert_array_equal(run(model, feeds)["logits"], run(normalized, feeds)["logits"])
    assert len(model.graph.node) == 19  # the input model is not modified


def test_normalize_keeps_constants_that_are_graph_outputs() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0]),
            helper.make_node("Constant", [], ["k"], value_int=3),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("k", TensorProto.INT64, []),
        ],
    )
    normalized = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.op_type for n in normalized.graph.node] == ["Constant", "Add"]
    assert [t.name for t in normalized.graph.initializer] == ["c"]
    assert run(normalized, {"x": np.ones(2, np.float32)})["y"].tolist() == [2.0, 3.0]


@pytest.mark.slow
def test_inspect_minilm(minilm: onnx.ModelProto) -> None:
    info = inspect_model(minilm)
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [
        ("input_ids", "int64", ("batch", "sequence")),
        ("attention_mask", "int64", ("batch", "sequence")),
        ("token_type_ids", "int64", ("batch", "sequence")),
    ]
    assert info.outputs[0].dtype == "float32" and info.outputs[0].shape[0] == "batch"
    # What the export contains: fused LayerNormalization, Softmax attention, Erf GELU.
    census = info.op_census
    assert (census["LayerNormalization"], census["Softmax"], census["Erf"]) == (13, 6, 6)
    assert census["MatMul"] == 48
    assert info.dynamic_dims["input_ids"] == ["batch", "sequence"]
    assert not info.weights_in_constants  # its Constants are scalars and shapes


def test_load_model_with_external_data(tmp_path: Path, tiny_eval_images: np.ndarray) -> None:
    model = zoo.tiny_cnn()
    path = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "m")
    loaded = load_model(path)
    assert not any(t.external_data for t in loaded.graph.initializer)
    feeds = {"image": tiny_eval_images}
    np.testing.assert_array_equal(run(loaded, feeds)["logits"], run(model, feeds)["logits"])


def _point_external_data_at(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    "location",
    [
        "../outside.bin",
        "sub/../../outside.bin",
        "/etc/passwd",
        "..\\outside.bin",
        "C:\\weights.bin",
    ],
)
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    path = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "m")
    (tmp_path / "outside.bin").write_bytes((tmp_path / "m" / "weights.bin").read_bytes())
    _point_external_data_at(path, location)
    with pytest.raises(ModelError, match="external data") as caught:
        load_model(path)
    assert caught.value.field == "model" and caught.value.hint


def test_external_data_through_a_link_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    path = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "m")
    outside = tmp_path / "outside.bin"
    (tmp_path / "m" / "weights.bin").rename(outside)
    os.symlink(outside, tmp_path / "m" / "weights.bin")
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)


def test_unreadable_models_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model\xff" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        load_model(junk)
    path = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "m")
    (tmp_path / "m" / "weights.bin").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(path)

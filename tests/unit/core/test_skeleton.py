"""core.skeleton: a model's structure read without its weights, still checkable and faithful."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import ModelError
from core.skeleton import load_skeleton


def _model(tensor_maker: str = "raw") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 64)).astype(np.float32)
    if tensor_maker == "raw":
        weight = numpy_helper.from_array(w, "w")
    else:  # float_data: packed float32 laid out like raw_data
        weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], w.reshape(-1).tolist())
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    then = helper.make_graph(
        [helper.make_node("Identity", ["big"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [128, 64])],
        [numpy_helper.from_array(rng.normal(size=(128, 64)).astype(np.float32), "big")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [64, 64])],
    )
    constant = numpy_helper.from_array(rng.normal(size=(32, 64)).astype(np.float32), "cv")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
            helper.make_node("Constant", [], ["c"], name="const", value=constant),
            helper.make_node("If", ["flag"], ["branch"], name="if", then_branch=then, else_branch=other),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, None]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [32, 64]),
            helper.make_tensor_value_info("branch", TensorProto.FLOAT, ["m", 64]),
        ],
        [weight, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@pytest.mark.parametrize("maker", ["raw", "float_data"])
def test_the_skeleton_keeps_the_structure_and_points_at_the_real_bytes(
    tmp_path: Path, maker: str
) -> None:
    model = _model(maker)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    skeleton = load_skeleton(path)
    assert skeleton.stripped == 3  # w, the Constant's value and the subgraph's initializer
    assert not skeleton.external
    assert len(skeleton.model.SerializeToString()) < 4096
    # same graph, same small tensors; the stripped ones read back to the same values
    assert [n.name for n in skeleton.model.graph.node] == [n.name for n in model.graph.node]
    assert skeleton.model.graph.input == model.graph.input
    assert skeleton.model.graph.initializer[1] == model.graph.initializer[1]  # shape stays inline
    copy = tmp_path / "skeleton.onnx"
    copy.write_bytes(skeleton.model.SerializeToString())
    onnx.checker.check_model(str(copy), full_check=True)
    loaded = onnx.load(str(copy))  # reads the stripped data from model.onnx at its offsets
    for got, want in zip(loaded.graph.initializer, model.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))
    got_c, want_c = loaded.graph.node[2].attribute[0].t, model.graph.node[2].attribute[0].t
    np.testing.assert_array_equal(numpy_helper.to_array(got_c), numpy_helper.to_array(want_c))
    got_big = helper.get_node_attr_value(loaded.graph.node[3], "then_branch").initializer[0]
    want_big = helper.get_node_attr_value(model.graph.node[3], "then_branch").initializer[0]
    np.testing.assert_array_equal(numpy_helper.to_array(got_big), numpy_helper.to_array(want_big))


def test_a_model_with_external_files_keeps_their_references(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    skeleton = load_skeleton(path)
    assert skeleton.external
    assert skeleton.stripped == 1  # a tensor onnx.save left inline (an attribute's)
    locations = {
        e.value for t in skeleton.model.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"w.bin"}


def test_a_stripped_tensor_whose_bytes_do_not_fit_its_shape_is_refused(tmp_path: Path) -> None:
    model = _model()
    tensor = model.graph.initializer[0]
    tensor.raw_data = tensor.raw_data[:-4]  # one float short
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="16,380 bytes of data but its shape"):
        load_skeleton(path)


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage that is no protobuf at all", b"\x3a\xff\xff\xff\x0f"],
    ids=["empty", "garbage", "length-past-end"],
)
def test_unreadable_files_are_model_errors(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(payload)
    with pytest.raises(ModelError, match="ONNX model"):
        load_skeleton(path)


def test_a_truncated_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(_model().SerializeToString()[:-700])
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        load_skeleton(path)


def test_reading_a_large_model_takes_little_memory(tmp_path: Path) -> None:
    side = 4096  # 64 MiB of weights
    weight = numpy_helper.from_array(np.ones((side, side), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", side])],
        [weight],
    )
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph), path)
    del weight, graph
    script = (
        "import resource, sys; from pathlib import Path; from core.skeleton import load_skeleton;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "s = load_skeleton(Path(sys.argv[1])); assert s.stripped == 1;"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    grown_kib = int(subprocess.check_output([sys.executable, "-c", script, str(path)], text=True))
    assert grown_kib < 16 * 1024  # not the 64 MiB of weights


def test_external_data_that_does_not_fit_its_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    weights = tmp_path / "w.bin"
    weights.write_bytes(weights.read_bytes()[:-100])  # the last tensor runs past the end
    with pytest.raises(ModelError, match="bytes at offset"):
        load_skeleton(path)

"""Model uploads: checked from the skeleton (little memory), refused at upload when no backend
can build them (opsets this server does not know, ops of custom domains)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from core.errors import ModelError
from service.store.ingest import check_operators
from tests.unit.service.support import stored_files


def _model(
    nodes: list[onnx.NodeProto],
    opsets: dict[str, int] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    return helper.make_model(graph, opset_imports=imports, functions=functions or [])


def test_standard_and_onnx_runtime_ops_and_local_functions_pass() -> None:
    check_operators(_model([helper.make_node("Relu", ["x"], ["y"])]), "m.onnx")
    check_operators(
        _model(
            [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
            {"": 17, "com.microsoft": 1},
        ),
        "m.onnx",
    )
    body = helper.make_function(
        "local.fns", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    check_operators(
        _model(
            [helper.make_node("Twice", ["x"], ["y"], domain="local.fns")],
            {"": 17, "local.fns": 1},
            [body],
        ),
        "m.onnx",
    )


@pytest.mark.parametrize(
    ("opsets", "needle"),
    [
        ({"": 9999}, "opset 9999 of 'ai.onnx'"),
        ({"": 17, "ai.onnx.ml": 99}, "opset 99 of 'ai.onnx.ml'"),
        ({"": 0}, "opset 0 of 'ai.onnx'"),
    ],
)
def test_opsets_this_server_does_not_know_are_refused(opsets: dict[str, int], needle: str) -> None:
    with pytest.raises(ModelError) as info:
        check_operators(_model([helper.make_node("Relu", ["x"], ["y"])], opsets), "m.onnx")
    assert needle in info.value.message
    assert "newest this server knows" in info.value.message
    assert info.value.field == "file"


def test_custom_domain_ops_are_refused_naming_the_node() -> None:
    model = _model(
        [helper.make_node("MyOp", ["x"], ["y"], name="mine", domain="com.example")],
        {"": 17, "com.example": 1},
    )
    with pytest.raises(ModelError) as info:
        check_operators(model, "m.onnx")
    assert "node 'mine' uses op 'MyOp' of domain 'com.example'" in info.value.message
    assert "custom domain" in info.value.message


def test_an_op_onnx_runtime_does_not_have_is_refused() -> None:
    model = _model(
        [helper.make_node("NoSuchFusedThing", ["x"], ["y"], domain="com.microsoft")],
        {"": 17, "com.microsoft": 1},
    )
    with pytest.raises(ModelError, match="ONNX Runtime has no op 'NoSuchFusedThing'"):
        check_operators(model, "m.onnx")


def test_a_custom_op_inside_a_subgraph_is_refused() -> None:
    branch = helper.make_graph(
        [helper.make_node("Secret", [], ["t"], domain="acme")],
        "b",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
    )
    model = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        {"": 17, "acme": 1},
    )
    with pytest.raises(ModelError, match="'Secret' of domain 'acme'"):
        check_operators(model, "m.onnx")


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (_model([helper.make_node("Relu", ["x"], ["y"])], {"": 9999}), "opset 9999"),
        (
            _model([helper.make_node("Op", ["x"], ["y"], domain="x.y")], {"": 17, "x.y": 1}),
            "domain 'x.y'",
        ),
    ],
    ids=["opset-9999", "custom-domain"],
)
def test_the_api_refuses_them_at_upload_and_keeps_nothing(
    client: TestClient, data_dir: Path, model: onnx.ModelProto, needle: str
) -> None:
    response = client.post(
        "/v1/models", files={"file": ("m.onnx", model.SerializeToString(), "application/octet-stream")}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_invalid"
    assert needle in error["message"]
    assert error["hint"]
    assert stored_files(data_dir) == []


def test_a_large_model_uploads_and_no_skeleton_copy_stays(client: TestClient, data_dir: Path) -> None:
    import numpy as np
    from onnx import numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 1024), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1024])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    response = client.post(
        "/v1/models", files={"file": ("m.onnx", model.SerializeToString(), "application/octet-stream")}
    )
    assert response.status_code == 201, response.text
    files = stored_files(data_dir)
    assert not [f for f in files if ".skeleton-" in f], files
    assert response.json()["inputs"][0]["shape"] == ["n", 4]

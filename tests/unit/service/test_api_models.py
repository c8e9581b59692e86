from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.errors import ModelError
from tests.unit.service.support import (
    dataset_bytes,
    external_data_zip,
    model_bytes,
    stored_files,
    zip_bytes,
)


def _upload(client: TestClient, data: bytes, name: str = "tiny.onnx") -> object:
    return client.post("/v1/models", files={"file": (name, data, "application/octet-stream")})


def test_upload_records_the_interface_and_dedups_by_content(client: TestClient) -> None:
    data = model_bytes()
    first = _upload(client, data)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["id"] == hashlib.sha256(data).hexdigest()
    assert first.headers["location"] == f"/v1/models/{body['id']}"
    assert body["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert body["outputs"][0]["name"] == "logits"
    assert body["dynamic_dims"]["image"] == ["batch"]
    assert body["op_census"]["Conv"] == 3
    assert (body["opset"], body["num_nodes"], body["external_data"]) == (17, 12, False)
    again = _upload(client, data, "renamed.onnx")
    assert again.status_code == 200
    assert again.json()["id"] == body["id"]
    assert client.get("/v1/models").json()["total"] == 1
    assert client.get(f"/v1/models/{body['id']}").json() == body


def test_zip_with_external_data_is_accepted(client: TestClient, tmp_path: Path) -> None:
    response = _upload(client, external_data_zip(tmp_path), "model.zip")
    assert response.status_code == 201, response.text
    assert response.json()["external_data"] is True
    assert response.json()["inputs"][0]["name"] == "image"


@pytest.mark.parametrize(
    ("name", "payload", "code", "needle"),
    [
        ("tiny.onnx", model_bytes()[:300], "model_invalid", "not a readable ONNX model"),
        ("notes.onnx", b"this is not a model at all", "model_invalid", "not a readable ONNX"),
        ("m.zip", zip_bytes({"../evil.onnx": model_bytes()}), "archive_invalid", "unsafe"),
        (
            "m.zip",
            zip_bytes({"a.onnx": model_bytes(), "b.onnx": model_bytes()}),
            "model_invalid",
            "exactly one",
        ),
        ("m.zip", b"PK\x03\x04 truncated zip", "archive_invalid", "not a readable zip"),
    ],
    ids=["truncated", "not-onnx", "zip-dotdot", "zip-two-models", "zip-truncated"],
)
def test_bad_models_are_refused_and_leave_nothing(
    client: TestClient, data_dir: Path, name: str, payload: bytes, code: str, needle: str
) -> None:
    response = _upload(client, payload, name)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert needle in error["message"]
    assert error["hint"]
    assert client.get("/v1/models").json()["total"] == 0
    assert stored_files(data_dir) == []


def test_external_data_escaping_its_folder_is_refused(
    client: TestClient, tmp_path: Path, data_dir: Path
) -> None:
    import onnx

    from tests import zoo

    path = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "m")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../weights.bin"
    payload = zip_bytes(
        {
            "model.onnx": model.SerializeToString(),
            "weights.bin": (path.parent / "weights.bin").read_bytes(),
        }
    )
    response = _upload(client, payload, "m.zip")
    assert response.status_code == 422
    assert "outside the model's folder" in response.json()["error"]["message"]
    assert stored_files(data_dir) == []


@pytest.mark.parametrize("location", ["sub/../weights.bin", "..\\weights.bin", "C:weights.bin"])
def test_a_location_the_build_refuses_is_refused_at_upload(
    make_client: Callable[..., TestClient], data_dir: Path, tmp_path: Path, location: str
) -> None:
    """One loader: what a build would refuse never gets in (these resolve inside the folder
    on Linux, yet are not plain relative paths)."""
    import onnx

    from engines.graph.inspect import load_model
    from tests import zoo

    client = make_client()
    path = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "m")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)
    (path.parent / "sub").mkdir()
    with pytest.raises(ModelError):
        load_model(path)
    payload = zip_bytes(
        {
            "model.onnx": model.SerializeToString(),
            "weights.bin": (path.parent / "weights.bin").read_bytes(),
            "sub/keep.txt": b"",
        }
    )
    response = _upload(client, payload, "m.zip")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "model"
    assert stored_files(data_dir) == []


def test_oversized_upload_is_413_and_leaves_nothing(
    make_client: Callable[..., TestClient], data_dir: Path
) -> None:
    client = make_client(max_upload_bytes=1000)
    response = _upload(client, model_bytes())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert stored_files(data_dir) == []


def test_oversized_chunked_upload_is_cut_off_while_streaming(
    make_client: Callable[..., TestClient], data_dir: Path
) -> None:
    client = make_client(max_upload_bytes=1000)
    boundary = "xyz"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n\r\n'
    ).encode()

    def body() -> object:  # no Content-Length: the limit must hold while streaming
        yield head
        for _ in range(10):
            yield b"\0" * 500
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/models",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413
    assert stored_files(data_dir) == []


@pytest.mark.parametrize(
    ("headers", "content", "needle"),
    [
        ({"content-type": "application/json"}, b"{}", "not multipart"),
        (
            {"content-type": "multipart/form-data; boundary=b"},
            b'--b\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--b--\r\n',
            "no file part",
        ),
    ],
)
def test_malformed_uploads_are_400(
    client: TestClient, headers: dict[str, str], content: bytes, needle: str
) -> None:
    response = client.post("/v1/models", content=content, headers=headers)
    assert response.status_code == 400
    assert needle in response.json()["error"]["message"]


def test_unknown_model_is_404_with_envelope(client: TestClient) -> None:
    response = client.get("/v1/models/" + "0" * 64)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert client.delete("/v1/models/nope").status_code == 404


def test_delete_removes_row_and_files(client: TestClient, data_dir: Path) -> None:
    model_id = _upload(client, model_bytes()).json()["id"]
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert client.get(f"/v1/models/{model_id}").status_code == 404
    assert stored_files(data_dir) == []


def test_delete_is_refused_while_builds_use_the_model(client: TestClient) -> None:
    model_id = _upload(client, model_bytes()).json()["id"]
    dataset = client.post(
        "/v1/datasets",
        files={"file": ("d.npz", dataset_bytes())},
        data={"model_id": model_id},
    ).json()
    build = client.post("/v1/builds", json={"model_id": model_id, "dataset_id": dataset["id"]})
    assert build.status_code == 202
    response = client.delete(f"/v1/models/{model_id}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "in_use"
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 409
    assert client.get(f"/v1/models/{model_id}").status_code == 200


def test_list_paginates(client: TestClient) -> None:
    ids = {_upload(client, model_bytes(seed=seed)).json()["id"] for seed in range(3)}
    page1 = client.get("/v1/models", params={"limit": 2}).json()
    page2 = client.get("/v1/models", params={"limit": 2, "offset": 2}).json()
    assert (page1["total"], len(page1["items"]), len(page2["items"])) == (3, 2, 1)
    assert {m["id"] for m in page1["items"] + page2["items"]} == ids
    bad = client.get("/v1/models", params={"limit": 0})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "limit"

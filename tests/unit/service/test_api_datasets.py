from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests import zoo
from tests.unit.service.support import (
    dataset_bytes,
    images,
    model_bytes,
    npz_bytes,
    stored_files,
    zip_bytes,
)


@pytest.fixture
def model_id(client: TestClient) -> str:
    response = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())})
    return str(response.json()["id"])


def _upload(client: TestClient, data: bytes, name: str = "d.npz", **fields: str) -> object:
    return client.post("/v1/datasets", files={"file": (name, data)}, data=fields)


def _files_besides_models(data_dir: Path) -> list[str]:
    return [f for f in stored_files(data_dir) if not f.startswith("models/")]


def test_npz_validated_against_the_model(client: TestClient, model_id: str) -> None:
    response = _upload(client, dataset_bytes(count=7), model_id=model_id)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["num_samples"], body["format"], body["model_id"]) == (7, "npz", model_id)
    assert body["inputs"] == [{"name": "image", "dtype": "float32", "shape": [3, 16, 16]}]
    assert len(body["digest"]) == 64
    again = _upload(client, dataset_bytes(count=7), model_id=model_id)
    assert again.status_code == 200
    assert again.json()["id"] == body["id"]
    listed = client.get("/v1/datasets", params={"model_id": model_id}).json()
    assert [d["id"] for d in listed["items"]] == [body["id"]]


def test_same_samples_in_another_container_have_the_same_digest(client: TestClient) -> None:
    arrays = images(5)
    npz = _upload(client, npz_bytes(image=arrays)).json()
    buf = io.BytesIO()
    np.save(buf, arrays)
    shards = _upload(client, zip_bytes({"image.npy": buf.getvalue()}), "d.zip").json()
    assert npz["id"] != shards["id"]
    assert npz["digest"] == shards["digest"]
    assert shards["format"] == "zip"


def test_image_zip_with_preprocessing(client: TestClient, model_id: str, tmp_path: Path) -> None:
    photos = zoo.photo_crops(4, size=40)
    archive = zoo.images_zip(photos, tmp_path / "imgs.zip")
    spec = '{"resize_shorter": 16, "center_crop": 16}'
    response = _upload(client, archive.read_bytes(), "imgs.zip", model_id=model_id, preprocess=spec)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["format"], body["num_samples"]) == ("images", 4)
    assert body["preprocess"]["center_crop"] == 16


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _nan_images() -> bytes:
    data = images(4)
    data[2, 0, 0, 0] = np.nan
    return npz_bytes(image=data)


@pytest.mark.parametrize(
    ("name", "payload", "needle"),
    [
        ("d.zip", zip_bytes({"image.npy": _pickled_npy()}), "pickle"),
        ("d.zip", zip_bytes({"../image.npy": dataset_bytes()}), "unsafe"),
        ("d.npz", _nan_images(), "NaN"),
        ("d.npz", npz_bytes(image=np.zeros((3, 3, 8, 8), np.float32)), "shape"),
        ("d.npz", npz_bytes(pixels=images(2)), "pixels"),
        ("d.npz", b"garbage", "d.npz"),
        ("d.txt", b"1,2,3", "not a dataset format"),
        ("d.npz", pickle.dumps({"image": images(2)}), "d.npz"),
    ],
    ids=[
        "pickled-npy",
        "zip-dotdot",
        "nan",
        "shape-mismatch",
        "wrong-name",
        "garbage",
        "csv",
        "pickle-file",
    ],
)
def test_bad_datasets_are_refused_and_leave_nothing(
    client: TestClient, model_id: str, data_dir: Path, name: str, payload: bytes, needle: str
) -> None:
    response = _upload(client, payload, name, model_id=model_id)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] in ("dataset_invalid", "archive_invalid")
    assert needle.lower() in error["message"].lower()
    assert client.get("/v1/datasets").json()["total"] == 0
    assert _files_besides_models(data_dir) == []


def test_nan_is_refused_even_without_a_model(client: TestClient, data_dir: Path) -> None:
    response = _upload(client, _nan_images())
    assert response.status_code == 422
    assert _files_besides_models(data_dir) == []


def test_unknown_model_id_is_404(client: TestClient, data_dir: Path) -> None:
    response = _upload(client, dataset_bytes(), model_id="f" * 64)
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "model_id"
    assert stored_files(data_dir) == []


def test_bad_preprocess_spec_is_422_naming_it(client: TestClient, model_id: str) -> None:
    response = _upload(client, b"PK", "imgs.zip", model_id=model_id, preprocess='{"layout": "CHW"}')
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "preprocess"


def test_existing_dataset_is_revalidated_against_another_model(client: TestClient) -> None:
    first = _upload(client, dataset_bytes()).json()
    other = client.post(
        "/v1/models", files={"file": ("two.onnx", zoo.tiny_two_input().SerializeToString())}
    ).json()
    response = _upload(client, dataset_bytes(), model_id=other["id"])
    assert response.status_code == 422
    assert client.get(f"/v1/datasets/{first['id']}").status_code == 200


def test_delete(client: TestClient, data_dir: Path) -> None:
    dataset_id = _upload(client, dataset_bytes()).json()["id"]
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404
    assert stored_files(data_dir) == []

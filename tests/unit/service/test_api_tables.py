from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import minmax
from calibrators.table import CalibrationTable
from tests import zoo
from tests.unit.service.support import images, model_bytes


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> CalibrationTable:
    path = tmp_path_factory.mktemp("table") / "tiny.onnx"
    path.write_bytes(model_bytes())
    return calibrate(path, CalibrationDataset.from_arrays({"image": images(8)}), minmax())


@pytest.fixture
def model_id(client: TestClient) -> str:
    return str(client.post("/v1/models", files={"file": ("t.onnx", model_bytes())}).json()["id"])


def _import(client: TestClient, model_id: str, text: str, **fields: str) -> object:
    return client.post(
        "/v1/calibration-tables",
        files={"file": ("t.cache", text.encode())},
        data={"model_id": model_id, **fields},
    )


def test_import_a_tensorrt_cache_and_read_it_back(
    client: TestClient, model_id: str, table: CalibrationTable
) -> None:
    text = table.to_cache_text(101303)
    response = _import(client, model_id, text)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["source"], body["model_id"], body["num_tensors"]) == (
        "imported",
        model_id,
        len(table.amax),
    )
    assert body["algorithm"] == "MinMaxCalibration"
    assert body["missing_tensors"] == []
    assert _import(client, model_id, text).status_code == 200
    table_id = body["id"]
    assert client.get(f"/v1/calibration-tables/{table_id}").json() == body
    cache = client.get(f"/v1/calibration-tables/{table_id}", params={"format": "trt"})
    assert cache.text == text
    old = client.get(
        f"/v1/calibration-tables/{table_id}", params={"format": "trt", "trt_version": "8.6.1"}
    )
    assert old.text.splitlines()[0] == "TRT-8601-MinMaxCalibration"
    as_json = CalibrationTable.from_json(
        client.get(f"/v1/calibration-tables/{table_id}", params={"format": "json"}).text
    )
    assert as_json.amax.keys() == table.amax.keys()
    listed = client.get("/v1/calibration-tables", params={"model_id": model_id}).json()
    assert [t["id"] for t in listed["items"]] == [table_id]


def test_missing_tensors_are_reported(
    client: TestClient, model_id: str, table: CalibrationTable
) -> None:
    partial = table.model_copy(update={"amax": dict(list(table.amax.items())[:3])})
    body = _import(client, model_id, partial.to_cache_text()).json()
    assert body["num_tensors"] == 3
    assert set(body["missing_tensors"]) == set(list(table.amax)[3:])


def test_tensors_unknown_to_the_model_are_refused_unless_ignored(
    client: TestClient, model_id: str, table: CalibrationTable, data_dir: Path
) -> None:
    extra = table.model_copy(update={"amax": {**table.amax, "not_in_model": 1.0}})
    refused = _import(client, model_id, extra.to_cache_text())
    assert refused.status_code == 422
    assert "not_in_model" in refused.json()["error"]["message"]
    assert client.get("/v1/calibration-tables").json()["total"] == 0
    assert list((data_dir / "blobs").rglob("*.*")) == []
    accepted = _import(client, model_id, extra.to_cache_text(), ignore_unknown="true")
    assert accepted.status_code == 201
    assert accepted.json()["num_tensors"] == len(table.amax)


def test_a_table_of_another_model_is_refused(client: TestClient) -> None:
    other = client.post(
        "/v1/models", files={"file": ("two.onnx", zoo.tiny_two_input().SerializeToString())}
    ).json()
    cache = "TRT-101303-EntropyCalibration2\nsomething: 3c010a14\n"
    response = _import(client, other["id"], cache)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "table_invalid"


@pytest.mark.parametrize(
    "payload", ["not a cache", "TRT-101303-EntropyCalibration2\nx: zz\n", '{"format": 1}']
)
def test_malformed_caches_are_422(client: TestClient, model_id: str, payload: str) -> None:
    response = _import(client, model_id, payload)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "table_invalid"


def test_import_needs_a_model(client: TestClient, table: CalibrationTable) -> None:
    response = client.post(
        "/v1/calibration-tables", files={"file": ("t.cache", table.to_cache_text().encode())}
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "model_id"
    assert _import(client, "f" * 64, table.to_cache_text()).status_code == 404


def test_unknown_table_is_404(client: TestClient) -> None:
    assert client.get("/v1/calibration-tables/nope").status_code == 404

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.unit.service.support import dataset_bytes, model_bytes


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_needs_a_live_worker(
    client: TestClient, make_client: Callable[..., TestClient]
) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"]["ok"] and body["checks"]["storage"]["ok"]
    assert not body["checks"]["workers"]["ok"]
    assert body["error"]["code"] == "unavailable"
    with_worker = make_client(workers=1)
    ready = with_worker.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["ready"] is True


def test_metrics_count_builds_queue_and_uploads(client: TestClient) -> None:
    model = client.post("/v1/models", files={"file": ("t.onnx", model_bytes())}).json()
    data = dataset_bytes()
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", data)}).json()
    client.post("/v1/builds", json={"model_id": model["id"], "dataset_id": dataset["id"]})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert 'trtforge_builds{status="queued"} 1' in lines
    assert 'trtforge_builds{status="succeeded"} 0' in lines
    assert "trtforge_queue_depth 1" in lines
    assert f'trtforge_upload_bytes_total{{kind="dataset"}} {len(data)}' in lines
    assert 'trtforge_stage_duration_seconds_count{stage="calibrate"} 0' in lines
    assert "# TYPE trtforge_builds gauge" in lines


def test_openapi_has_stable_operation_ids(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {
        "upload_model",
        "list_models",
        "get_model",
        "delete_model",
        "upload_dataset",
        "create_build",
        "list_builds",
        "get_build",
        "build_events",
        "get_build_logs",
        "cancel_build",
        "download_artifact",
        "get_artifact_metadata",
        "get_report",
        "list_calibration_tables",
        "get_calibration_table",
        "import_calibration_table",
        "healthz",
        "readyz",
        "metrics",
    } <= ids
    upload = spec["paths"]["/v1/models"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload


def test_unknown_routes_and_methods_use_the_envelope(client: TestClient) -> None:
    missing = client.get("/v2/everything")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = client.put("/v1/models")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"

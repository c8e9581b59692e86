from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from engines.backends.base import BuildTarget
from service.db import Database
from service.queue.database import DatabaseQueue
from service.settings import Settings
from tests.unit.service.support import dataset_bytes, model_bytes


@pytest.fixture
def ids(client: TestClient) -> dict[str, str]:
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}).json()
    dataset = client.post(
        "/v1/datasets", files={"file": ("d.npz", dataset_bytes())}, data={"model_id": model["id"]}
    ).json()
    return {"model_id": model["id"], "dataset_id": dataset["id"]}


def test_submit_is_202_with_location_and_identical_requests_dedup(
    client: TestClient, ids: dict[str, str]
) -> None:
    response = client.post("/v1/builds", json=ids)
    assert response.status_code == 202, response.text
    build = response.json()
    assert response.headers["location"] == f"/v1/builds/{build['id']}"
    assert (build["status"], build["progress"], build["attempts"]) == ("queued", 0.0, 0)
    # the target is the claiming worker's to decide: none yet (this app runs no worker)
    assert (build["requested_backend"], build["worker_id"]) == ("auto", None)
    assert (build["backend"], build["backend_version"], build["compute_capability"]) == (None,) * 3
    assert build["spec"]["precision"] == "int8-fp16"
    assert build["links"]["events"] == f"/v1/builds/{build['id']}/events"
    same = client.post("/v1/builds", json={**ids, "spec": {"precision": "int8-fp16"}})
    assert same.status_code == 200
    assert same.json()["id"] == build["id"]
    other = client.post("/v1/builds", json={**ids, "spec": {"precision": "fp16"}})
    assert other.status_code == 202
    assert other.json()["cache_key"] != build["cache_key"]
    split = client.post("/v1/builds", json={**ids, "accuracy": {"eval_fraction": 0.5}})
    assert split.status_code == 202  # other calibration samples: another table and artifact
    # other measurements are another build with its own report (the table cache is shared)
    report_only = client.post("/v1/builds", json={**ids, "benchmark": {"duration_s": 9}})
    assert report_only.status_code == 202
    assert report_only.json()["id"] != build["id"]
    assert report_only.json()["benchmark"]["duration_s"] == 9
    fewer = client.post("/v1/builds", json={**ids, "accuracy": {"max_samples": 3}})
    assert fewer.status_code == 202
    assert fewer.json()["id"] not in (build["id"], report_only.json()["id"])
    again = client.post("/v1/builds", json={**ids, "benchmark": {"duration_s": 9.0}})
    assert (again.status_code, again.json()["id"]) == (200, report_only.json()["id"])


def test_get_list_filter_and_paginate(client: TestClient, ids: dict[str, str]) -> None:
    made = [
        client.post("/v1/builds", json={**ids, "spec": {"precision": p}}).json()["id"]
        for p in ("fp32", "fp16", "int8")
    ]
    assert client.get(f"/v1/builds/{made[0]}").json()["spec"]["precision"] == "fp32"
    listing = client.get("/v1/builds", params={"model_id": ids["model_id"], "limit": 2}).json()
    assert (listing["total"], len(listing["items"])) == (3, 2)
    client.post(f"/v1/builds/{made[1]}/cancel")
    cancelled = client.get("/v1/builds", params={"status": "cancelled"}).json()
    assert [b["id"] for b in cancelled["items"]] == [made[1]]
    assert client.get("/v1/builds", params={"model_id": "x"}).json()["total"] == 0
    bad = client.get("/v1/builds", params={"status": "exploded"})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "status"


def test_cancel_a_queued_build_ends_it_and_resubmitting_requeues(
    client: TestClient, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json=ids).json()
    cancelled = client.post(f"/v1/builds/{build['id']}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled"
    assert client.post(f"/v1/builds/{build['id']}/cancel").json()["status"] == "cancelled"
    logs = client.get(f"/v1/builds/{build['id']}/logs").json()
    assert "cancelled before it started" in logs[-1]["message"]
    again = client.post("/v1/builds", json=ids)
    assert again.status_code == 202
    assert (again.json()["id"], again.json()["status"]) == (build["id"], "queued")


def test_delete_only_ended_builds(client: TestClient, ids: dict[str, str]) -> None:
    build = client.post("/v1/builds", json=ids).json()
    refused = client.delete(f"/v1/builds/{build['id']}")
    assert refused.status_code == 409
    assert "Cancel it first" in refused.json()["error"]["hint"]
    client.post(f"/v1/builds/{build['id']}/cancel")
    assert client.delete(f"/v1/builds/{build['id']}").status_code == 204
    assert client.get(f"/v1/builds/{build['id']}").status_code == 404
    assert client.delete(f"/v1/models/{ids['model_id']}").status_code == 204


@pytest.mark.parametrize(
    ("change", "status", "field", "needle"),
    [
        ({"model_id": "0" * 64}, 404, "model_id", "No model"),
        ({"dataset_id": "0" * 64}, 404, "dataset_id", "No dataset"),
        ({"table_id": "0" * 64}, 404, "table_id", "No calibration table"),
        ({"spec": {"precision": "int4"}}, 422, "spec.precision", "spec.precision"),
        (
            {
                "spec": {
                    "profiles": {
                        "image": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]}
                    }
                }
            },
            422,
            None,
            "16",
        ),
        (
            {"spec": {"profiles": {"pixels": {"min": [1], "opt": [1], "max": [1]}}}},
            422,
            None,
            "pixels",
        ),
        ({"spec": {"keep": {"int8": ["no_such_node"]}}}, 422, None, "no_such_node"),
        ({"accuracy": {"eval_fraction": 1.5}}, 422, "accuracy.eval_fraction", "eval_fraction"),
        ({"surprise": 1}, 422, "surprise", "surprise"),
    ],
    ids=[
        "model",
        "dataset",
        "table",
        "precision",
        "shape-outside-dims",
        "unknown-input",
        "keep",
        "fraction",
        "extra",
    ],
)
def test_bad_requests_are_refused_before_queueing(
    client: TestClient,
    ids: dict[str, str],
    change: dict[str, object],
    status: int,
    field: str | None,
    needle: str,
) -> None:
    response = client.post("/v1/builds", json={**ids, **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"]
    if field is not None:
        assert error["field"] == field
    assert client.get("/v1/builds").json()["total"] == 0


def test_dataset_with_other_inputs_is_refused(client: TestClient, ids: dict[str, str]) -> None:
    from tests.unit.service.support import images, npz_bytes

    other = client.post(
        "/v1/datasets", files={"file": ("o.npz", npz_bytes(a=images(2), b=images(2)))}
    ).json()
    response = client.post("/v1/builds", json={**ids, "dataset_id": other["id"]})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "dataset_id"


def test_unknown_build_everywhere_is_404(client: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/builds/nope"),
        ("GET", "/v1/builds/nope/logs"),
        ("GET", "/v1/builds/nope/events"),
        ("POST", "/v1/builds/nope/cancel"),
        ("DELETE", "/v1/builds/nope"),
        ("GET", "/v1/builds/nope/artifact"),
        ("GET", "/v1/builds/nope/artifact/metadata"),
        ("GET", "/v1/builds/nope/report"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "not_found"


def test_artifact_and_report_of_an_unfinished_build_are_409(
    client: TestClient, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json=ids).json()
    for path in ("artifact", "artifact/metadata", "report"):
        response = client.get(f"/v1/builds/{build['id']}/{path}")
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "not_ready"


def test_events_of_an_ended_build_stream_logs_status_and_end(
    client: TestClient, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json=ids).json()
    client.post(f"/v1/builds/{build['id']}/cancel")
    response = client.get(f"/v1/builds/{build['id']}/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    kinds = [
        line.split(": ", 1)[1] for line in response.text.splitlines() if line.startswith("event:")
    ]
    assert kinds[0] == "log"
    assert kinds[-2:] == ["status", "end"]
    resumed = client.get(f"/v1/builds/{build['id']}/events", headers={"Last-Event-ID": "999999999"})
    assert "event: log" not in resumed.text


def test_a_backend_no_live_worker_builds_is_refused_with_the_live_targets(
    client: TestClient, ids: dict[str, str], settings: Settings
) -> None:
    wanted = {**ids, "spec": {"backend": "tensorrt"}}
    # no live worker: the build waits for one (workers may start later, elsewhere)
    waiting = client.post("/v1/builds", json=wanted)
    assert waiting.status_code == 202 and waiting.json()["requested_backend"] == "tensorrt"
    assert client.post(f"/v1/builds/{waiting.json()['id']}/cancel").status_code == 202
    db = Database(settings.resolved_database_url)
    try:
        cpu = BuildTarget(backend="onnxruntime", backend_version="1.22.0", compute_capability="cpu")
        DatabaseQueue(db, settings).register_worker("cpu-worker", 1, [cpu])
    finally:
        db.dispose()
    refused = client.post("/v1/builds", json=wanted)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["field"]) == ("no_target", "spec.backend")
    assert "onnxruntime 1.22.0 (cpu)" in error["message"] and "GET /v1/workers" in error["hint"]
    assert client.post("/v1/builds", json=ids).status_code == 202  # auto: the CPU worker serves it
    listed = client.get("/v1/workers").json()
    assert [(w["id"], w["state"], w["slots"]) for w in listed] == [("cpu-worker", "live", 1)]
    assert listed[0]["targets"] == [cpu.model_dump()] and listed[0]["running_builds"] == []

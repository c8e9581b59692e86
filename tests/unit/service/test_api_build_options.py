"""``POST /v1/builds`` takes what ``trtforge build`` takes: an accuracy budget, a separate
evaluation set with labels, the gate and keep rules; datasets that cannot feed the model are
refused at submission (422 naming the field), not in the worker. HEAD on the artifact."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from engines.accuracy_report import AccuracyMetric
from service.schemas import BuildCreate, BuildReport, BuildStatus
from service.settings import Settings
from service.store.builds import build_cache_key
from tests.unit.service.support import (
    FAST,
    dataset_bytes,
    images,
    model_bytes,
    npz_bytes,
    run_in_process,
)


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: these builds run the whole pipeline (the queue tests cover PostgreSQL)."""
    return sqlite_url


@pytest.fixture
def model_id(client: TestClient) -> str:
    return str(client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}).json()["id"])


def _dataset(client: TestClient, data: bytes, name: str = "d.npz") -> str:
    answer = client.post("/v1/datasets", files={"file": (name, data)})  # no model_id: unchecked
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def test_a_dataset_of_the_wrong_shape_uploaded_without_model_id_is_refused_at_submission(
    client: TestClient, model_id: str
) -> None:
    wrong = _dataset(client, npz_bytes(image=np.zeros((4, 3, 8, 8), np.float32)))
    answer = client.post("/v1/builds", json={"model_id": model_id, "dataset_id": wrong})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["field"] == "dataset_id"
    assert "[3, 8, 8]" in error["message"] and "[batch, 3, 16, 16]" in error["message"]
    assert "model_id=" in error["hint"]  # the fix: upload it checked against the model
    rank = _dataset(client, npz_bytes(image=np.zeros((4, 768), np.float32)), "flat.npz")
    answer = client.post("/v1/builds", json={"model_id": model_id, "dataset_id": rank})
    assert answer.status_code == 422 and "[768]" in answer.json()["error"]["message"]
    assert client.get("/v1/builds").json()["total"] == 0


def test_evaluation_data_and_labels_are_checked_at_submission(
    client: TestClient, model_id: str
) -> None:
    calib = _dataset(client, dataset_bytes(count=8))
    base = {"model_id": model_id, "dataset_id": calib}
    unknown = client.post("/v1/builds", json={**base, "eval_dataset_id": "0" * 64})
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "eval_dataset_id"
    wrong = _dataset(client, npz_bytes(x=np.zeros((3, 5), np.float32)), "wrong.npz")
    answer = client.post("/v1/builds", json={**base, "eval_dataset_id": wrong})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "eval_dataset_id"
    evaluation = _dataset(client, dataset_bytes(count=6, seed=3), "eval.npz")
    miscounted = client.post(
        "/v1/builds", json={**base, "eval_dataset_id": evaluation, "labels": [1, 2]}
    )
    assert miscounted.status_code == 422
    assert miscounted.json()["error"]["field"] == "labels"
    assert "2 labels for 6 samples" in miscounted.json()["error"]["message"]
    gate_needs_labels = client.post(
        "/v1/builds", json={**base, "spec": {"gate": ["accuracy_drop:0.01"]}}
    )
    assert gate_needs_labels.status_code == 422
    assert gate_needs_labels.json()["error"]["field"] == "labels"


def test_an_accuracy_budget_needs_int8_and_held_out_samples(
    client: TestClient, model_id: str
) -> None:
    data = _dataset(client, dataset_bytes(count=8))
    base = {"model_id": model_id, "dataset_id": data, "accuracy_budget": "cosine:0.999"}
    fp16 = client.post("/v1/builds", json={**base, "spec": {"precision": "fp16"}})
    assert fp16.status_code == 422 and fp16.json()["error"]["field"] == "accuracy_budget"
    none_held = client.post("/v1/builds", json={**base, "accuracy": {"eval_fraction": 0}})
    assert none_held.status_code == 422
    assert none_held.json()["error"]["field"] == "accuracy.eval_fraction"
    unreadable = client.post("/v1/builds", json={**base, "accuracy_budget": "cosine"})
    assert unreadable.status_code == 422
    assert unreadable.json()["error"]["field"] == "accuracy_budget"


def test_a_build_with_an_accuracy_budget_keeps_nodes_and_reports_its_search(
    client: TestClient, settings: Settings, model_id: str
) -> None:
    data = _dataset(client, dataset_bytes(count=10))
    body = {
        "model_id": model_id,
        "dataset_id": data,
        "accuracy_budget": {"metric": "sqnr_db", "value": 80},  # beyond INT8: keep nodes out
        "spec": {"gate": "none", "precision": "int8"},
        **FAST,
    }
    build = client.post("/v1/builds", json=body).json()
    assert build["accuracy_budget"] == {"metric": "sqnr_db", "value": 80.0}
    assert run_in_process(settings, build["id"]) is BuildStatus.SUCCEEDED
    report = BuildReport.model_validate(client.get(f"/v1/builds/{build['id']}/report").json())
    mixed = report.mixed_precision
    assert mixed is not None and mixed.kept_nodes
    reasons = [report.kept_nodes[n] for n in mixed.kept_nodes if n in report.kept_nodes]
    assert reasons and all("accuracy budget search" in r for r in reasons)


def test_a_separate_evaluation_set_with_labels_is_measured_and_calibration_uses_all(
    client: TestClient, settings: Settings, model_id: str
) -> None:
    calib = _dataset(client, dataset_bytes(count=8))
    evaluation = _dataset(client, npz_bytes(image=images(6, seed=4)), "eval.npz")
    labels = [0, 1, 2, 3, 4, 5]
    body = {
        "model_id": model_id,
        "dataset_id": calib,
        "eval_dataset_id": evaluation,
        "labels": labels,
        "spec": {"gate": "none"},
        **FAST,
    }
    build = client.post("/v1/builds", json=body).json()
    assert (build["eval_dataset_id"], build["labels"]) == (evaluation, 6)
    assert run_in_process(settings, build["id"]) is BuildStatus.SUCCEEDED
    report = BuildReport.model_validate(client.get(f"/v1/builds/{build['id']}/report").json())
    assert report.dataset["calibration_samples"] == 8
    assert report.dataset["evaluation_samples"] == 6
    assert report.accuracy is not None
    assert report.accuracy.metric(AccuracyMetric.ACCURACY) is not None  # measured on the labels
    in_use = client.delete(f"/v1/datasets/{evaluation}")
    assert in_use.status_code == 409  # an evaluation set is in use like a calibration set


def test_head_on_an_artifact_answers_its_headers_without_the_bytes(
    client: TestClient, settings: Settings, model_id: str
) -> None:
    data = _dataset(client, dataset_bytes(count=6))
    build = client.post(
        "/v1/builds", json={"model_id": model_id, "dataset_id": data, "spec": {"precision": "fp16"}, **FAST}
    ).json()
    url = f"/v1/builds/{build['id']}/artifact"
    assert client.head(url).status_code == 409  # not built yet, as GET answers
    assert run_in_process(settings, build["id"]) in (BuildStatus.SUCCEEDED, BuildStatus.FAILED)
    head, get = client.head(url), client.get(url)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    for name in ("etag", "content-length", "content-disposition", "accept-ranges"):
        assert head.headers[name] == get.headers[name]
    ranged = client.head(url, headers={"Range": "bytes=0-9"})
    assert (ranged.status_code, ranged.headers["content-length"]) == (206, "10")
    assert client.head(url, headers={"If-None-Match": get.headers["etag"]}).status_code == 304


def test_requests_without_the_new_options_keep_their_cache_keys() -> None:
    plain = BuildCreate(model_id="m", dataset_id="d")
    assert plain.evaluation_options == {}
    labelled = BuildCreate(model_id="m", dataset_id="d", labels=[1])
    assert build_cache_key(labelled) != build_cache_key(plain)
    assert build_cache_key(plain) == build_cache_key(BuildCreate.model_validate(plain.model_dump()))

"""Per-node sensitivity as a build-scoped resource: asked for in a build request, or afterwards
with ``POST /v1/builds/{id}/sensitivity``; computed on a worker (here: the pipeline run
in-process on the tiny CNN, as the worker's child runs it)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.schemas import BuildStatus, SensitivityPublic
from service.settings import Settings
from tests.unit.service.support import (
    FAST,
    run_in_process,
)

QUICK = {"samples": 2, "max_nodes": 2, "only_this": True}


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: these builds run the whole pipeline (the queue tests cover PostgreSQL)."""
    return sqlite_url


def test_a_build_that_asks_for_sensitivity_ranks_its_nodes_by_onnx_name(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json={**ids, **FAST, "sensitivity": QUICK}).json()
    assert build["sensitivity"]["max_nodes"] == 2
    assert build["links"]["sensitivity"] == f"/v1/builds/{build['id']}/sensitivity"
    waiting = SensitivityPublic.model_validate(client.get(build["links"]["sensitivity"]).json())
    assert (waiting.status, waiting.report, waiting.run_build_id) == (
        BuildStatus.QUEUED,
        None,
        build["id"],
    )
    assert run_in_process(settings, build["id"]) is BuildStatus.SUCCEEDED
    done = SensitivityPublic.model_validate(client.get(build["links"]["sensitivity"]).json())
    assert done.status is BuildStatus.SUCCEEDED and done.report is not None
    report = done.report
    assert report.evaluated_nodes == 2 and report.quantizable_nodes >= 2
    assert [n.rank for n in report.nodes] == list(range(1, len(report.nodes) + 1))
    quantized = client.get(f"/v1/builds/{build['id']}/report").json()["quantized_nodes"]
    assert set(report.ranked_nodes) <= set(quantized)  # ONNX node names
    assert client.get(f"/v1/builds/{build['id']}/report").json()["sensitivity"]["samples"] == 2


def test_post_sensitivity_on_a_finished_build_queues_its_request_with_sensitivity(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json={**ids, **FAST}).json()
    assert run_in_process(settings, build["id"]) is BuildStatus.SUCCEEDED
    missing = client.get(f"/v1/builds/{build['id']}/sensitivity")
    assert missing.status_code == 404
    assert f"POST /v1/builds/{build['id']}/sensitivity" in missing.json()["error"]["hint"]

    asked = client.post(f"/v1/builds/{build['id']}/sensitivity", json=QUICK)
    assert asked.status_code == 202, asked.text
    assert asked.headers["location"] == f"/v1/builds/{build['id']}/sensitivity"
    public = SensitivityPublic.model_validate(asked.json())
    assert public.build_id == build["id"] and public.run_build_id != build["id"]
    assert (public.status, public.report) == (BuildStatus.QUEUED, None)
    run = client.get(f"/v1/builds/{public.run_build_id}").json()
    assert (run["spec"], run["model_id"]) == (build["spec"], build["model_id"])
    again = client.post(f"/v1/builds/{build['id']}/sensitivity", json=QUICK)
    assert again.status_code == 200 and again.json()["run_build_id"] == public.run_build_id

    assert run_in_process(settings, public.run_build_id) is BuildStatus.SUCCEEDED
    assert client.get(f"/v1/builds/{public.run_build_id}").json()["table_from_cache"] is True
    done = client.get(f"/v1/builds/{build['id']}/sensitivity").json()
    assert done["status"] == "succeeded" and done["report"]["evaluated_nodes"] == 2
    assert client.get(f"/v1/builds/{build['id']}").json()["links"]["sensitivity"]


def test_sensitivity_of_a_build_without_int8_is_refused_naming_the_field(
    client: TestClient, ids: dict[str, str]
) -> None:
    fp16 = client.post("/v1/builds", json={**ids, **FAST, "spec": {"precision": "fp16"}}).json()
    answer = client.post(f"/v1/builds/{fp16['id']}/sensitivity", json={})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["field"] == "sensitivity" and "int8" in error["hint"]
    direct = client.post(
        "/v1/builds", json={**ids, "spec": {"precision": "fp16"}, "sensitivity": {}}
    )
    assert direct.status_code == 422 and direct.json()["error"]["field"] == "sensitivity"


def test_sensitivity_measured_in_accuracy_needs_labels(
    client: TestClient, ids: dict[str, str]
) -> None:
    answer = client.post("/v1/builds", json={**ids, "sensitivity": {"metric": "accuracy"}})
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "labels"
    unknown = client.post("/v1/builds/" + "0" * 32 + "/sensitivity", json={})
    assert unknown.status_code == 404


def test_the_last_sensitivity_asked_for_is_the_one_answered(
    client: TestClient, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json={**ids, **FAST, "sensitivity": QUICK}).json()
    other = client.post(f"/v1/builds/{build['id']}/sensitivity", json={**QUICK, "samples": 3})
    assert other.status_code == 202 and other.json()["run_build_id"] != build["id"]
    answered = client.get(f"/v1/builds/{build['id']}/sensitivity").json()
    assert (answered["run_build_id"], answered["options"]["samples"]) == (
        other.json()["run_build_id"],
        3,
    )
    own = client.post(f"/v1/builds/{build['id']}/sensitivity", json=QUICK)
    assert own.status_code == 200 and own.json()["run_build_id"] == build["id"]
    assert client.get(f"/v1/builds/{build['id']}/sensitivity").json()["run_build_id"] == build["id"]

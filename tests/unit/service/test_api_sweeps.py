"""Sweeps as a resource: a set of normal builds, one per variant, aggregated (status, measured
points, Pareto front, chart data). Builds run in-process, as a worker's child runs them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from service.schemas import BuildStatus, Scope, SweepPublic, SweepStatus
from service.settings import Settings
from tests.unit.service.support import (
    FAST,
    bearer,
    dataset_bytes,
    model_bytes,
    run_in_process,
)


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: these builds run the whole pipeline (the queue tests cover PostgreSQL)."""
    return sqlite_url


def test_a_sweep_builds_each_variant_and_compares_them_on_the_pareto_front(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    body = {**ids, **FAST, "variants": ["fp32", "int8"], "name": "tiny sweep"}
    answer = client.post("/v1/sweeps", json=body)
    assert answer.status_code == 202, answer.text
    sweep = SweepPublic.model_validate(answer.json())
    assert answer.headers["location"] == f"/v1/sweeps/{sweep.id}"
    assert [v.name for v in sweep.variants] == ["fp32", "int8"]
    assert sweep.status is SweepStatus.QUEUED and sweep.points == []
    builds = {v.name: client.get(f"/v1/builds/{v.build_id}").json() for v in sweep.variants}
    assert {n: b["spec"]["precision"] for n, b in builds.items()} == {"fp32": "fp32", "int8": "int8"}

    assert run_in_process(settings, builds["fp32"]["id"]) is BuildStatus.SUCCEEDED
    half = SweepPublic.model_validate(client.get(f"/v1/sweeps/{sweep.id}").json())
    assert half.status is SweepStatus.RUNNING and [p.variant for p in half.points] == ["fp32"]
    run_in_process(settings, builds["int8"]["id"])  # passes or fails its gate: measured either way

    done = SweepPublic.model_validate(client.get(f"/v1/sweeps/{sweep.id}").json())
    assert done.status is SweepStatus.SUCCEEDED and done.name == "tiny sweep"
    assert [p.variant for p in done.points] == ["fp32", "int8"]
    fp32, int8 = done.points
    assert fp32.speedup_vs_fp32 == 1.0 and fp32.size_vs_fp32 == 1.0
    assert int8.size_bytes > 0 and int8.precision.value == "int8"
    assert done.accuracy_metric is not None and done.accuracy_metric.value == "top1_agreement"
    assert fp32.accuracy_value == 1.0
    assert done.pareto_front and set(done.pareto_front) <= {"fp32", "int8"}
    assert done.chart.y == "top1_agreement"
    assert [p["variant"] for p in done.chart.points] == ["fp32", "int8"]
    assert done.chart.points[0]["x"] == fp32.latency_p50_ms
    assert [bar["variant"] for bar in done.chart.latency] == ["fp32", "int8"]
    svg = client.get(f"/v1/sweeps/{sweep.id}/chart.svg")  # the CLI's sweep.svg, from REST
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert "<svg" in svg.text and "Sweep of tiny.onnx" in svg.text
    assert "fp32" in svg.text and "top1_agreement" in svg.text


def test_a_sweep_reuses_an_identical_build_and_presets_name_variants(
    client: TestClient, ids: dict[str, str]
) -> None:
    single = client.post("/v1/builds", json={**ids, **FAST, "spec": {"precision": "fp16"}}).json()
    sweep = client.post("/v1/sweeps", json={**ids, **FAST, "preset": "fp16"}).json()
    assert [v["name"] for v in sweep["variants"]] == ["fp32", "fp16"]
    assert sweep["variants"][1]["build_id"] == single["id"]  # deduplicated by its cache key
    listed = client.get(f"/v1/sweeps?model_id={ids['model_id']}").json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == sweep["id"]
    assert client.get("/v1/sweeps?model_id=other").json()["total"] == 0
    auto = client.post("/v1/sweeps", json={**ids, "variants": ["int8", "auto:cosine:0.99"]}).json()
    build = client.get(f"/v1/builds/{auto['variants'][1]['build_id']}").json()
    assert build["accuracy_budget"] == {"metric": "cosine", "value": 0.99}
    assert client.delete(f"/v1/sweeps/{auto['id']}").status_code == 204
    assert client.get(f"/v1/sweeps/{auto['id']}").status_code == 404
    assert client.get(f"/v1/builds/{build['id']}").status_code == 200  # its builds stay


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"variants": ["fp32", "int4"]}, "variants"),
        ({"variants": ["fp16", "fp16"]}, "variants"),
        ({"variants": ["fp16"], "preset": "int8"}, "variants"),
        ({"spec": {"precision": "int8"}}, "spec.precision"),
        ({"variants": []}, "variants"),
        ({"preset": "nope"}, "preset"),
    ],
)
def test_a_sweep_that_cannot_be_read_is_refused_naming_the_field(
    client: TestClient, ids: dict[str, str], body: dict[str, object], field: str
) -> None:
    answer = client.post("/v1/sweeps", json={**ids, **body})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == field
    assert client.get("/v1/builds").json()["total"] == 0


def test_a_sweeps_variant_that_fails_unmeasured_is_listed_with_its_error(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    sweep = client.post("/v1/sweeps", json={**ids, **FAST, "variants": ["fp32", "fp16"]}).json()
    first, second = (v["build_id"] for v in sweep["variants"])
    assert client.post(f"/v1/builds/{second}/cancel").status_code == 202
    assert run_in_process(settings, first) is BuildStatus.SUCCEEDED
    done = client.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "partial"
    assert [p["variant"] for p in done["points"]] == ["fp32"]
    assert [v["status"] for v in done["variants"]] == ["succeeded", "cancelled"]
    assert [(e["field"], e["code"]) for e in done["failed"]] == [("fp16", "cancelled")]


def test_another_projects_sweeps_sensitivity_and_names_are_not_found(
    make_client: Callable[..., TestClient], db_url: str
) -> None:
    secured = make_client(auth=True)
    alpha, beta, admin = (
        bearer(db_url, scope, project)
        for scope, project in ((Scope.BUILD, "alpha"), (Scope.BUILD, "beta"), (Scope.ADMIN, "ops"))
    )
    model = secured.post(
        "/v1/models", files={"file": ("tiny.onnx", model_bytes())}, headers=alpha
    ).json()
    dataset = secured.post(
        "/v1/datasets",
        files={"file": ("d.npz", dataset_bytes(count=10))},
        data={"model_id": model["id"]},
        headers=alpha,
    ).json()
    ids = {"model_id": model["id"], "dataset_id": dataset["id"]}
    sweep = secured.post("/v1/sweeps", json={**ids, "preset": "fp16"}, headers=alpha).json()
    build_id = sweep["variants"][0]["build_id"]
    assert secured.get(f"/v1/sweeps/{sweep['id']}", headers=alpha).status_code == 200
    assert secured.get(f"/v1/sweeps/{sweep['id']}", headers=beta).status_code == 404
    assert secured.get("/v1/sweeps", headers=beta).json()["total"] == 0
    assert secured.get("/v1/sweeps", headers=admin).json()["total"] == 1
    assert secured.post("/v1/sweeps", json={**ids, "preset": "fp16"}, headers=beta).status_code == 404
    asked = secured.post(f"/v1/builds/{build_id}/sensitivity", json={}, headers=beta)
    assert asked.status_code == 404
    patched = secured.patch(f"/v1/models/{model['id']}", json={"name": "x"}, headers=beta)
    assert patched.status_code == 404
    assert secured.get("/v1/models?name=tiny", headers=beta).json()["total"] == 0
    assert secured.delete(f"/v1/sweeps/{sweep['id']}", headers=beta).status_code == 404

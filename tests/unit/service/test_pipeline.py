"""The pipeline run in-process on the real tiny CNN and real data (ONNX Runtime backend)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.db import Database
from service.schemas import BuildReport, BuildStatus
from service.settings import Settings
from tests.unit.service.support import (
    FAST,
    run_in_process,
    stored_files,
)


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: these builds run the whole pipeline (the queue tests cover PostgreSQL)."""
    return sqlite_url


def test_a_build_runs_all_stages_and_publishes_artifact_and_report(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json={**ids, **FAST}).json()
    assert run_in_process(settings, build["id"]) is BuildStatus.SUCCEEDED
    done = client.get(f"/v1/builds/{build['id']}").json()
    assert (done["status"], done["progress"], done["stage"]) == ("succeeded", 1.0, None)
    assert set(done["stage_seconds"]) == {"calibrate", "build", "benchmark", "evaluate"}
    assert done["table_from_cache"] is False
    assert done["artifact"]["filename"] == f"tiny-int8-fp16-{build['id'][:8]}.onnx"
    artifact = client.get(done["links"]["artifact"])
    import hashlib

    assert hashlib.sha256(artifact.content).hexdigest() == done["artifact"]["sha256"]
    report = BuildReport.model_validate(client.get(done["links"]["report"]).json())
    assert report.calibration is not None and report.calibration.num_tensors > 0
    assert report.dataset["calibration_samples"] == 8
    assert report.dataset["evaluation_samples"] == 2
    assert report.accuracy is not None and report.accuracy.outputs[0].name == "logits"
    assert report.performance.queries >= 3
    assert report.quantized_nodes
    html = client.get(done["links"]["report_html"])
    assert html.headers["content-type"].startswith("text/html")
    assert done["artifact"]["sha256"] in html.text
    metadata = client.get(done["links"]["metadata"]).json()
    assert metadata["sha256"] == done["artifact"]["sha256"]
    assert metadata["backend"] == "onnxruntime"
    messages = [line["message"] for line in client.get(done["links"]["logs"]).json()]
    assert messages[-1] == "Build succeeded."
    assert any(m.startswith("calibrate: done") for m in messages)
    assert not (settings.data_dir / "work" / build["id"]).exists()
    dashboard = client.get("/")
    assert build["id"][:12] in dashboard.text
    assert done["links"]["report_html"].replace("&", "&amp;") in dashboard.text


def test_a_second_build_reuses_the_calibration_table(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    first = client.post("/v1/builds", json={**ids, **FAST}).json()
    assert run_in_process(settings, first["id"]) is BuildStatus.SUCCEEDED
    second = client.post("/v1/builds", json={**ids, **FAST, "spec": {"precision": "int8"}}).json()
    assert second["id"] != first["id"]
    assert run_in_process(settings, second["id"]) is BuildStatus.SUCCEEDED
    a, b = (client.get(f"/v1/builds/{x['id']}").json() for x in (first, second))
    assert b["table_from_cache"] is True
    assert a["table_id"] == b["table_id"]
    assert "calibrate" in b["stage_seconds"]
    # smoothing (auto) was judged on the whole model: the tables with and without it are both
    # kept (later builds of either reuse them), the build names the one it used
    messages = [line["message"] for line in client.get(f"/v1/builds/{first['id']}/logs").json()]
    assert any(m.startswith("Smoothing (auto) judged on ") for m in messages)
    tables = client.get("/v1/calibration-tables").json()
    assert tables["total"] == 2 and a["table_id"] in {t["id"] for t in tables["items"]}


def test_the_build_page_says_how_the_model_was_prepared(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json={**ids, **FAST}).json()
    assert run_in_process(settings, build["id"]) is BuildStatus.SUCCEEDED
    report = client.get(f"/v1/builds/{build['id']}/report").json()
    judged = report["smoothing"]["judged"]
    applied = sum(t["applied"] for t in report["smoothing"]["tensors"])
    page = client.get(f"/builds/{build['id']}/results").text
    prepared = re.search(r'<ul id="prepared"[^>]*>(.*?)</ul>', page, re.S)
    assert prepared is not None, "no model preparation on the build page"
    text = " ".join(prepared.group(1).split())
    assert f"{applied} of {len(report['smoothing']['tensors'])} activations smoothed" in text
    assert (
        f"whole-model check on {judged['samples']} held-out samples: INT8 SQNR "
        f"{judged['sqnr_smoothed_db']:.1f} dB smoothed vs {judged['sqnr_plain_db']:.1f} dB without"
    ) in text
    assert f"<strong>{'kept' if judged['kept'] else 'dropped'}</strong>" in text
    assert "quantized layer biases corrected" in text


def test_fp16_builds_skip_calibration(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    build = client.post(
        "/v1/builds",
        json={**ids, **FAST, "spec": {"precision": "fp16"}, "accuracy": {"enabled": False}},
    ).json()
    assert run_in_process(settings, build["id"]) is BuildStatus.SUCCEEDED
    done = client.get(f"/v1/builds/{build['id']}").json()
    assert set(done["stage_seconds"]) == {"build", "benchmark"}
    assert (done["table_id"], done["table_from_cache"]) == (None, None)
    assert client.get(done["links"]["report"]).json()["accuracy"] is None


def test_a_cancel_request_stops_at_the_next_stage_boundary(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json={**ids, **FAST}).json()
    db = Database(settings.resolved_database_url)
    with db.session() as session:
        from service.db.models import BuildRow

        session.get_one(BuildRow, build["id"]).cancel_requested = True
        session.commit()
    db.dispose()
    assert run_in_process(settings, build["id"]) is BuildStatus.CANCELLED
    done = client.get(f"/v1/builds/{build['id']}").json()
    assert (done["status"], done["artifact"]) == ("cancelled", None)
    assert [f for f in stored_files(settings.data_dir) if f.startswith(("work/", "blobs/"))] == []


def test_failures_are_recorded_with_the_error_envelope(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    build = client.post("/v1/builds", json={**ids, **FAST}).json()
    dataset = next((settings.data_dir / "datasets").iterdir())
    (dataset / "d.npz").write_bytes(b"corrupted after upload")
    assert run_in_process(settings, build["id"]) is BuildStatus.FAILED
    done = client.get(f"/v1/builds/{build['id']}").json()
    assert done["error"]["code"] in ("dataset_invalid", "archive_invalid")
    assert done["error"]["message"] and done["error"]["hint"]
    assert done["artifact"] is None
    assert "Build failed" in client.get(done["links"]["logs"]).json()[-1]["message"]
    assert not (settings.data_dir / "work" / build["id"]).exists()


def test_a_build_that_misses_its_accuracy_gate_fails_and_keeps_its_artifact(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    # 200 dB is out of any INT8 build's reach: the gate must fail, whatever the ranges
    spec = {"precision": "int8", "gate": "sqnr_db:200"}
    build = client.post("/v1/builds", json={**ids, **FAST, "spec": spec}).json()
    assert run_in_process(settings, build["id"]) is BuildStatus.FAILED
    done = client.get(f"/v1/builds/{build['id']}").json()
    assert done["error"]["code"] == "accuracy_gate_failed"
    assert "logits" in done["error"]["message"] and "sqnr_db" in done["error"]["message"]
    assert "--" not in done["error"]["hint"]  # REST words, not CLI flags
    assert "spec.calibration.method" in done["error"]["hint"]
    import hashlib

    artifact = client.get(done["links"]["artifact"])
    assert artifact.status_code == 200
    assert hashlib.sha256(artifact.content).hexdigest() == done["artifact"]["sha256"]
    report = BuildReport.model_validate(client.get(done["links"]["report"]).json())
    assert report.gate is not None and not report.gate.passed
    assert report.gate.failed_outputs == ["logits"]
    assert "gated" in client.get("/").text


def test_the_default_gate_passes_a_sound_build_and_none_turns_it_off(
    client: TestClient, settings: Settings, ids: dict[str, str]
) -> None:
    sound = client.post("/v1/builds", json={**ids, **FAST}).json()
    assert run_in_process(settings, sound["id"]) is BuildStatus.SUCCEEDED
    report = BuildReport.model_validate(client.get(f"/v1/builds/{sound['id']}/report").json())
    assert report.gate is not None and report.gate.passed
    assert report.gate.gate_text == "sqnr_db >= 10"
    off = client.post(
        "/v1/builds", json={**ids, **FAST, "spec": {"precision": "int8", "gate": "none"}}
    ).json()
    assert run_in_process(settings, off["id"]) is BuildStatus.SUCCEEDED
    report = BuildReport.model_validate(client.get(f"/v1/builds/{off['id']}/report").json())
    assert report.gate is not None and report.gate.passed and not report.gate.gate.enabled

"""The service over real HTTP: the Python client and raw httpx against ``trtforge serve``."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from engines.spec import BuildSpec, Precision
from service.client import BuildEvent, TrtforgeClient
from service.errors import ApiError, DownloadError
from service.schemas import AccuracyOptions, BenchmarkOptionsIn, BuildStatus
from tests.integration.conftest import Server
from tests.unit.service.support import dataset_bytes, images, model_bytes, npz_bytes, zip_bytes

FAST = BenchmarkOptionsIn(warmup_ms=0, iterations=3, duration_s=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    model = folder / "tiny.onnx"
    model.write_bytes(model_bytes())
    data = folder / "calib.npz"
    data.write_bytes(dataset_bytes(count=10))
    return {"model": model, "data": data}


@pytest.fixture
def client(server: Server) -> Iterator[TrtforgeClient]:
    with TrtforgeClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def built(server: Server, files: dict[str, Path]) -> dict[str, object]:
    """One INT8 build run to the end, with the events seen while waiting."""
    with TrtforgeClient(server.url) as client:
        progress: list[tuple[int, int]] = []
        model = client.upload_model(files["model"], progress=lambda d, t: progress.append((d, t)))
        dataset = client.upload_dataset(files["data"], model_id=model.id)
        build = client.submit_build(model.id, dataset.id, BuildSpec(), benchmark=FAST)
        events: list[BuildEvent] = []
        done = client.wait(build.id, timeout_s=120, on_event=events.append)
    return {
        "model": model,
        "dataset": dataset,
        "build": done,
        "events": events,
        "progress": progress,
    }


def test_a_build_end_to_end(built: dict[str, object], files: dict[str, Path]) -> None:
    build = built["build"]
    assert build.status is BuildStatus.SUCCEEDED, build.error  # type: ignore[attr-defined]
    progress = built["progress"]
    size = files["model"].stat().st_size
    assert progress and progress[-1] == (size, size)  # type: ignore[index]
    events = built["events"]
    kinds = {e.kind for e in events}  # type: ignore[attr-defined]
    assert {"status", "log", "end"} <= kinds
    assert events[-1].kind == "end" and events[-1].status is BuildStatus.SUCCEEDED  # type: ignore[index]
    logs = [e.log.message for e in events if e.log is not None]  # type: ignore[attr-defined]
    assert "Build succeeded." in logs


def test_artifact_download_checks_sha256_and_serves_ranges(
    server: Server, client: TrtforgeClient, built: dict[str, object], tmp_path: Path
) -> None:
    build = built["build"]
    artifact = build.artifact  # type: ignore[attr-defined]
    path = client.download_artifact(build.id, tmp_path, progress=None)  # type: ignore[attr-defined]
    data = path.read_bytes()
    assert path.name == artifact.filename
    assert hashlib.sha256(data).hexdigest() == artifact.sha256
    url = f"{server.url}/v1/builds/{build.id}/artifact"  # type: ignore[attr-defined]
    full = httpx.get(url)
    assert full.headers["etag"] == f'"{artifact.sha256}"'
    assert full.headers["content-length"] == str(len(data))
    assert artifact.filename in full.headers["content-disposition"]
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert part.content == data[100:200]
    assert httpx.get(url, headers={"If-None-Match": f'"{artifact.sha256}"'}).status_code == 304
    stale = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data
    beyond = httpx.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416
    assert beyond.json()["error"]["code"] == "range_not_satisfiable"


def test_downloads_resume_from_a_part_file(
    client: TrtforgeClient, built: dict[str, object], tmp_path: Path
) -> None:
    build = built["build"]
    artifact = build.artifact  # type: ignore[attr-defined]
    whole = client.download_artifact(build.id, tmp_path / "whole.onnx").read_bytes()  # type: ignore[attr-defined]
    target = tmp_path / "resumed.onnx"
    part = target.with_name(target.name + ".part")
    part.write_bytes(b"\0" * 1000)  # a wrong prefix: only a Range request keeps it
    with pytest.raises(DownloadError, match="does not match"):
        client.download_artifact(build.id, target)  # type: ignore[attr-defined]
    assert not part.exists() and not target.exists()
    part.write_bytes(whole[:1000])
    assert client.download_artifact(build.id, target).read_bytes() == whole  # type: ignore[attr-defined]
    assert hashlib.sha256(whole).hexdigest() == artifact.sha256
    assert not part.exists()


def test_report_metadata_and_dashboard(
    server: Server, client: TrtforgeClient, built: dict[str, object]
) -> None:
    build = built["build"]
    report = client.report(build.id)  # type: ignore[attr-defined]
    assert report.artifact.sha256 == build.artifact.sha256  # type: ignore[attr-defined]
    assert report.accuracy is not None and report.performance.queries >= 3
    assert report.calibration is not None and not report.calibration.from_cache
    html = client.report_html(build.id)  # type: ignore[attr-defined]
    assert "<h2>Accuracy against FP32</h2>" in html
    assert client.artifact_metadata(build.id)["sha256"] == build.artifact.sha256  # type: ignore[attr-defined]
    page = httpx.get(server.url + "/").text
    assert build.id[:12] in page and f"/v1/builds/{build.id}/artifact" in page  # type: ignore[attr-defined]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'trtforge_stage_duration_seconds_count{stage="build"}' in metrics


def test_identical_requests_dedup_and_tables_are_reused(
    server: Server, client: TrtforgeClient, built: dict[str, object]
) -> None:
    model, dataset, build = built["model"], built["dataset"], built["build"]
    again = httpx.post(
        f"{server.url}/v1/builds",
        json={"model_id": model.id, "dataset_id": dataset.id, "benchmark": FAST.model_dump()},  # type: ignore[attr-defined]
    )
    assert again.status_code == 200
    assert again.json()["id"] == build.id  # type: ignore[attr-defined]
    int8 = client.submit_build(
        model.id,  # type: ignore[attr-defined]
        dataset.id,  # type: ignore[attr-defined]
        BuildSpec(precision=Precision.INT8),
        benchmark=FAST,
        accuracy=AccuracyOptions(max_samples=1),  # same held-out split, so same table key
    )
    assert int8.id != build.id  # type: ignore[attr-defined]
    done = client.wait(int8.id, timeout_s=120)
    assert done.status is BuildStatus.SUCCEEDED, done.error
    assert done.table_from_cache is True
    assert done.table_id == build.table_id  # type: ignore[attr-defined]


def test_cancel_a_running_build(client: TrtforgeClient, built: dict[str, object]) -> None:
    model, dataset = built["model"], built["dataset"]
    slow = client.submit_build(
        model.id,  # type: ignore[attr-defined]
        dataset.id,  # type: ignore[attr-defined]
        BuildSpec(precision=Precision.FP16),
        benchmark=BenchmarkOptionsIn(warmup_ms=0, iterations=1, duration_s=60),
    )
    for event in client.events(slow.id):
        if event.status is BuildStatus.BENCHMARKING:
            break
    cancelled = client.cancel_build(slow.id)
    assert cancelled.cancel_requested
    done = client.wait(slow.id, timeout_s=30)
    assert done.status is BuildStatus.CANCELLED
    assert done.artifact is None


def _stored(server: Server) -> set[str]:
    return {
        p.relative_to(server.data_dir).as_posix()
        for p in server.data_dir.rglob("*")
        if p.is_file()
        and not p.name.startswith("trtforge.db")
        and "/tmp/" not in f"/{p.relative_to(server.data_dir).as_posix()}"
    }


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _nan() -> bytes:
    data = images(4)
    data[1, 2, 3, 4] = np.nan
    return npz_bytes(image=data)


BAD_UPLOADS = [
    ("models", "m.onnx", model_bytes()[:200], {}, 422, "model_invalid"),
    ("models", "m.onnx", b"not onnx", {}, 422, "model_invalid"),
    ("models", "m.zip", zip_bytes({"../../m.onnx": model_bytes()}), {}, 422, "archive_invalid"),
    ("models", "m.onnx", b"\0" * (3 << 20), {}, 413, "payload_too_large"),
    ("datasets", "d.zip", zip_bytes({"image.npy": _pickled_npy()}), {}, 422, "dataset_invalid"),
    ("datasets", "d.zip", zip_bytes({"../image.npy": dataset_bytes()}), {}, 422, "archive_invalid"),
    ("datasets", "d.npz", _nan(), {}, 422, "dataset_invalid"),
    (
        "datasets",
        "d.npz",
        npz_bytes(image=images(2)[:, :, :8, :8]),
        {"model": True},
        422,
        "dataset_invalid",
    ),
    ("datasets", "d.npz", dataset_bytes(), {"model_id": "0" * 64}, 404, "not_found"),
]


@pytest.mark.parametrize(
    ("resource", "name", "payload", "fields", "status", "code"),
    BAD_UPLOADS,
    ids=[
        "truncated-model",
        "non-onnx",
        "zip-dotdot-model",
        "oversized",
        "pickled-npy",
        "zip-dotdot-dataset",
        "nan",
        "shape-mismatch",
        "unknown-model-id",
    ],
)
def test_bad_uploads_get_the_envelope_and_leave_nothing(
    server: Server,
    built: dict[str, object],
    resource: str,
    name: str,
    payload: bytes,
    fields: dict[str, object],
    status: int,
    code: str,
) -> None:
    if fields.get("model") is True:  # validate against the module's model
        fields = {"model_id": built["model"].id}  # type: ignore[attr-defined]
    before = _stored(server)
    totals = {r: httpx.get(f"{server.url}/v1/{r}").json()["total"] for r in ("models", "datasets")}
    response = httpx.post(
        f"{server.url}/v1/{resource}", files={"file": (name, payload)}, data=fields, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and isinstance(error["hint"], str)
    assert _stored(server) == before
    assert {r: httpx.get(f"{server.url}/v1/{r}").json()["total"] for r in totals} == totals


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("GET", "/v1/models/" + "0" * 64, None, 404, "No model"),
        ("GET", "/v1/datasets/nope", None, 404, "No dataset"),
        ("GET", "/v1/builds/nope", None, 404, "No build"),
        ("GET", "/v1/calibration-tables/nope", None, 404, "No calibration table"),
        ("POST", "/v1/builds", {"model_id": "0" * 64, "dataset_id": "0" * 64}, 404, "No model"),
    ],
)
def test_unknown_ids_get_the_envelope(
    server: Server, method: str, path: str, body: object, status: int, needle: str
) -> None:
    response = httpx.request(method, server.url + path, json=body)
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


def test_a_spec_outside_the_models_dims_is_refused(
    server: Server, client: TrtforgeClient, built: dict[str, object]
) -> None:
    before = client.list_builds().total
    spec = {
        "profiles": {"image": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}}
    }
    response = httpx.post(
        f"{server.url}/v1/builds",
        json={"model_id": built["model"].id, "dataset_id": built["dataset"].id, "spec": spec},  # type: ignore[attr-defined]
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "spec_invalid"
    with pytest.raises(ApiError) as info:
        client.submit_build("0" * 64, "0" * 64)
    assert info.value.status_code == 404
    assert client.list_builds().total == before

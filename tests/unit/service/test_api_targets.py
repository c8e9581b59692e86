"""``POST /v1/builds`` with a target, ``GET /v1/workers`` labels and ``/metrics`` per target."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from engines.backends.base import BuildTarget
from service.db import Database
from service.queue.database import DatabaseQueue
from service.settings import Settings
from tests.unit.service.support import dataset_bytes, model_bytes

CPU = BuildTarget(backend="onnxruntime", backend_version="1.22.0", compute_capability="cpu")
H100 = BuildTarget(
    backend="tensorrt",
    backend_version="10.13.0",
    compute_capability="9.0",
    device="NVIDIA H100 80GB HBM3",
)


@pytest.fixture
def ids(client: TestClient) -> dict[str, str]:
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())}).json()
    dataset = client.post(
        "/v1/datasets", files={"file": ("d.npz", dataset_bytes())}, data={"model_id": model["id"]}
    ).json()
    return {"model_id": model["id"], "dataset_id": dataset["id"]}


@pytest.fixture
def queue(settings: Settings) -> Iterator[DatabaseQueue]:
    """The app's queue, seen from a worker's side (registering workers)."""
    db = Database(settings.resolved_database_url)
    yield DatabaseQueue(db, settings)
    db.dispose()


def test_a_targeted_build_waits_for_its_target_and_says_which(
    client: TestClient, ids: dict[str, str]
) -> None:
    target = {"gpu": "sm_90", "tensorrt": "10.13", "labels": ["vision", "big", "vision"]}
    response = client.post("/v1/builds", json={**ids, "target": target})
    assert response.status_code == 202, response.text  # no live worker: it waits for one
    build = response.json()
    wanted = {"gpu": "sm_90", "tensorrt": "10.13", "labels": ["big", "vision"]}
    assert build["requested_target"] == wanted
    assert client.get(f"/v1/builds/{build['id']}").json()["requested_target"] == wanted
    # the same request with labels in another order is the same build; another target is not
    same = client.post("/v1/builds", json={**ids, "target": {**target, "labels": ["big", "vision"]}})
    assert (same.status_code, same.json()["id"]) == (200, build["id"])
    other = client.post("/v1/builds", json={**ids, "target": {"gpu": "H100"}})
    assert other.status_code == 202 and other.json()["cache_key"] != build["cache_key"]
    # no target, or an empty one, keeps the untargeted build's key
    plain = client.post("/v1/builds", json=ids).json()
    assert plain["requested_target"] is None
    empty = client.post("/v1/builds", json={**ids, "target": {}})
    assert (empty.status_code, empty.json()["id"]) == (200, plain["id"])
    logs = client.get(f"/v1/builds/{build['id']}/logs").json()
    assert any("gpu sm_90; TensorRT 10.13; labels big, vision" in line["message"] for line in logs)


def test_bad_targets_are_refused(client: TestClient, ids: dict[str, str]) -> None:
    for target in ({"tensorrt": "ten"}, {"labels": ["no spaces"]}, {"cpu": "x"}):
        response = client.post("/v1/builds", json={**ids, "target": target})
        assert response.status_code == 422, (target, response.text)
    conflicting = client.post(
        "/v1/builds", json={**ids, "spec": {"backend": "onnxruntime"}, "target": {"tensorrt": "10"}}
    )
    assert conflicting.status_code == 422
    error = conflicting.json()["error"]
    assert (error["code"], error["field"]) == ("no_target", "target.tensorrt")


def test_a_target_no_live_worker_serves_is_refused_with_the_live_targets_and_labels(
    client: TestClient, ids: dict[str, str], queue: DatabaseQueue
) -> None:
    queue.register_worker("cpu-worker", 1, [CPU], ["team-a"])
    queue.register_worker("gpu-worker", 1, [H100, CPU])
    for target in ({"gpu": "A100"}, {"labels": ["team-b"]}, {"gpu": "H100", "labels": ["team-a"]}):
        refused = client.post("/v1/builds", json={**ids, "target": target})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["field"]) == ("no_target", "target")
        assert error["message"].endswith(
            "the live workers build for: tensorrt 10.13.0 (NVIDIA H100 80GB HBM3, sm 9.0), "
            "onnxruntime 1.22.0 (cpu); onnxruntime 1.22.0 (cpu) [labels: team-a]."
        ), error["message"]
        assert "GET /v1/workers" in error["hint"]
    for target in ({"gpu": "h100"}, {"labels": ["team-a"]}, {"tensorrt": "10.13", "gpu": "9.0"}):
        assert client.post("/v1/builds", json={**ids, "target": target}).status_code == 202
    listed = {w["id"]: w["labels"] for w in client.get("/v1/workers").json()}
    assert listed == {"cpu-worker": ["team-a"], "gpu-worker": []}


def test_metrics_count_the_queue_per_requested_target_and_workers_per_target(
    client: TestClient, ids: dict[str, str], queue: DatabaseQueue
) -> None:
    client.post("/v1/builds", json=ids)
    client.post("/v1/builds", json={**ids, "accuracy": {"seed": 1}})
    client.post("/v1/builds", json={**ids, "target": {"labels": ["vision", "big"]}})
    client.post(
        "/v1/builds",
        json={**ids, "spec": {"backend": "tensorrt"}, "target": {"gpu": "sm_90", "tensorrt": "10"}},
    )
    odd = BuildTarget(
        backend="tensorrt", backend_version="10.13.0", compute_capability="8.9", device='L4 "x"\\'
    )
    queue.register_worker("w1", 1, [H100, CPU], ["vision", "big"])
    queue.register_worker("w2", 1, [CPU])
    queue.register_worker("w3", 1, [CPU, odd])
    queue.register_worker("gone", 1, [CPU])
    queue.unregister_worker("gone")
    lines = client.get("/metrics").text.splitlines()
    assert "# TYPE trtforge_queue_depth_by_target gauge" in lines
    assert "# TYPE trtforge_workers_by_target gauge" in lines
    depth = sorted(line for line in lines if line.startswith("trtforge_queue_depth_by_target{"))
    assert depth == [
        'trtforge_queue_depth_by_target{backend="auto",gpu="",tensorrt="",labels=""} 2',
        'trtforge_queue_depth_by_target{backend="auto",gpu="",tensorrt="",labels="big,vision"} 1',
        'trtforge_queue_depth_by_target{backend="tensorrt",gpu="sm_90",tensorrt="10",labels=""} 1',
    ]
    workers = sorted(line for line in lines if line.startswith("trtforge_workers_by_target{"))
    cpu = 'backend="onnxruntime",backend_version="1.22.0",compute_capability="cpu",device="cpu"'
    assert workers == [
        f'trtforge_workers_by_target{{{cpu},labels=""}} 2',
        f'trtforge_workers_by_target{{{cpu},labels="big,vision"}} 1',
        'trtforge_workers_by_target{backend="tensorrt",backend_version="10.13.0",'
        'compute_capability="8.9",device="L4 \\"x\\"\\\\",labels=""} 1',
        'trtforge_workers_by_target{backend="tensorrt",backend_version="10.13.0",'
        'compute_capability="9.0",device="NVIDIA H100 80GB HBM3",labels="big,vision"} 1',
    ]
    assert "trtforge_queue_depth 4" in lines and "trtforge_workers 3" in lines

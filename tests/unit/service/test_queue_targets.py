"""Claims routed by the target a build asks for: GPU, TensorRT version, worker labels (real SQLite,
and PostgreSQL when configured)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from engines.backends.base import BuildTarget
from service.db import Database
from service.db.models import BuildRow
from service.queue import database as queue_database
from service.queue.base import QueuedTarget
from service.queue.database import DatabaseQueue
from service.queue.targets import serving_target, target_matches, wanted_capability
from service.schemas import TargetRequest
from service.settings import Settings
from tests.unit.service.support import QUEUES, insert_build, make_queue, make_settings

CPU = BuildTarget(backend="onnxruntime", backend_version="1.22.0", compute_capability="cpu")
H100 = BuildTarget(
    backend="tensorrt",
    backend_version="10.13.0",
    compute_capability="9.0",
    device="NVIDIA H100 80GB HBM3",
)
L4 = BuildTarget(
    backend="tensorrt", backend_version="10.1.0", compute_capability="8.9", device="NVIDIA L4"
)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path / "data", db_url)


@pytest.fixture(params=QUEUES)
def queue(request: pytest.FixtureRequest, db: Database, settings: Settings) -> DatabaseQueue:
    return make_queue(request.param, db, settings)


def _enqueue(
    db: Database,
    queue: DatabaseQueue,
    build_id: str,
    target: TargetRequest | None = None,
    backend: str = "auto",
) -> None:
    with db.session() as session:
        row = insert_build(session, build_id, requested_backend=backend)
        row.requested_target = None if target is None else target.model_dump(mode="json")
        queue.enqueue(session, build_id)
        session.commit()


def _claimed(queue: DatabaseQueue, worker: str, targets: list[BuildTarget]) -> list[str]:
    """Everything ``worker`` claims until nothing is left for it, in order."""
    taken: list[str] = []
    while (job := queue.claim(worker, targets)) is not None:
        taken.append(job.build_id)
    return taken


# -- matching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu", "capability"),
    [("sm_90", "9.0"), ("SM_86", "8.6"), ("sm_120", "12.0"), ("sm_90a", "9.0"), ("8.9", "8.9")],
)
def test_a_gpu_request_names_a_compute_capability(gpu: str, capability: str) -> None:
    assert wanted_capability(gpu) == capability


@pytest.mark.parametrize(
    ("request_", "h100", "l4", "cpu"),
    [
        (TargetRequest(gpu="sm_90"), True, False, False),
        (TargetRequest(gpu="9.0"), True, False, False),
        (TargetRequest(gpu="h100"), True, False, False),  # part of the name, any case
        (TargetRequest(gpu="NVIDIA"), True, True, False),
        (TargetRequest(tensorrt="10"), True, True, False),
        (TargetRequest(tensorrt="10.13"), True, False, False),
        (TargetRequest(tensorrt="10.1"), False, True, False),  # by components: not 10.13
        (TargetRequest(tensorrt="10.13.0"), True, False, False),
        (TargetRequest(gpu="L4", tensorrt="10.13"), False, False, False),  # all fields match
        (TargetRequest(), True, True, True),
    ],
)
def test_a_target_matches_when_every_field_asked_matches(
    request_: TargetRequest, h100: bool, l4: bool, cpu: bool
) -> None:
    assert [target_matches(request_, t) for t in (H100, L4, CPU)] == [h100, l4, cpu]


def test_the_serving_target_needs_every_label_and_keeps_the_backend_preference() -> None:
    wanted = TargetRequest(labels=["team-a", "big"])
    assert serving_target("auto", wanted, [CPU, H100], ["big"]) is None
    assert serving_target("auto", wanted, [CPU, H100], ["big", "team-a", "x"]) == H100
    assert serving_target("onnxruntime", wanted, [CPU, H100], ["big", "team-a"]) == CPU
    # a TensorRT version leaves auto only TensorRT targets
    assert serving_target("auto", TargetRequest(tensorrt="10"), [CPU], []) is None
    assert serving_target("onnxruntime", TargetRequest(tensorrt="10"), [CPU, H100], []) is None


def test_target_requests_are_validated_and_labels_normalized() -> None:
    assert TargetRequest(labels=["b", "a", "b"]).labels == ["a", "b"]
    assert TargetRequest().any_worker and not TargetRequest(labels=["a"]).any_worker
    assert str(TargetRequest(gpu="sm_90", tensorrt="10.13", labels=["a"])) == (
        "gpu sm_90; TensorRT 10.13; labels a"
    )
    for bad in ({"tensorrt": "10.x"}, {"gpu": ""}, {"labels": ["-a"]}, {"labels": ["a b"]}):
        with pytest.raises(ValidationError):
            TargetRequest.model_validate(bad)


# -- claims --------------------------------------------------------------------------------------


def test_targeted_builds_go_only_to_matching_workers(db: Database, queue: DatabaseQueue) -> None:
    _enqueue(db, queue, "on-h100", TargetRequest(gpu="sm_90"))
    _enqueue(db, queue, "on-l4", TargetRequest(gpu="L4"))
    _enqueue(db, queue, "trt-10.13", TargetRequest(tensorrt="10.13"))
    _enqueue(db, queue, "anywhere")
    queue.register_worker("l4", 1, [L4, CPU])
    queue.register_worker("h100", 1, [H100, CPU])
    assert _claimed(queue, "l4", [L4, CPU]) == ["on-l4", "anywhere"]
    assert _claimed(queue, "h100", [H100, CPU]) == ["on-h100", "trt-10.13"]
    with db.session() as session:
        rows = {row.id: row for row in session.query(BuildRow)}
    assert (rows["on-h100"].worker_id, rows["on-h100"].compute_capability) == ("h100", "9.0")
    assert (rows["trt-10.13"].backend, rows["trt-10.13"].backend_version) == ("tensorrt", "10.13.0")
    assert (rows["anywhere"].worker_id, rows["anywhere"].backend) == ("l4", "tensorrt")


def test_labelled_builds_need_a_worker_with_all_their_labels(
    db: Database, queue: DatabaseQueue
) -> None:
    _enqueue(db, queue, "vision", TargetRequest(labels=["vision"]))
    _enqueue(db, queue, "vision-big", TargetRequest(labels=["vision", "big"]))
    _enqueue(db, queue, "plain")
    queue.register_worker("unlabelled", 1, [CPU])
    queue.register_worker("vision", 1, [CPU], ["vision"])
    queue.register_worker("both", 1, [CPU], ["big", "vision"])
    assert _claimed(queue, "unlabelled", [CPU]) == ["plain"]
    assert _claimed(queue, "vision", [CPU]) == ["vision"]
    assert _claimed(queue, "both", [CPU]) == ["vision-big"]
    listed = {worker.id: worker.labels for worker in queue.workers()}
    assert listed == {"unlabelled": [], "vision": ["vision"], "both": ["big", "vision"]}


def test_a_worker_takes_the_oldest_job_it_can_build_past_others(
    db: Database, queue: DatabaseQueue
) -> None:
    for index in range(3):
        _enqueue(db, queue, f"elsewhere-{index}", TargetRequest(labels=["other"]))
    _enqueue(db, queue, "mine-1", TargetRequest(labels=["mine"]))
    _enqueue(db, queue, "plain")
    _enqueue(db, queue, "mine-2", TargetRequest(labels=["mine"]))
    queue.register_worker("w", 1, [CPU], ["mine"])
    assert _claimed(queue, "w", [CPU]) == ["mine-1", "plain", "mine-2"]
    assert queue.depth() == 3


# the database queue's paged scan (Procrastinate fetches across the servable queues)
@pytest.mark.parametrize("queue", ["database"], indirect=True)
def test_targeted_jobs_are_matched_page_by_page_and_a_cut_short_scan_skips_no_older_match(
    db: Database, queue: DatabaseQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_database, "_TARGETED_PAGE", 1)
    monkeypatch.setattr(queue_database, "_TARGETED_PAGES", 2)
    _enqueue(db, queue, "other-1", TargetRequest(labels=["other"]))
    _enqueue(db, queue, "mine", TargetRequest(labels=["mine"]))
    _enqueue(db, queue, "other-2", TargetRequest(labels=["other"]))
    _enqueue(db, queue, "plain")
    queue.register_worker("w", 1, [CPU], ["mine"])
    job = queue.claim("w", [CPU])
    assert job is not None and job.build_id == "mine"  # on the second page
    # two pages (other-1, other-2) end the scan: "plain" is newer than what was looked at
    assert queue.claim("w", [CPU]) is None
    monkeypatch.setattr(queue_database, "_TARGETED_PAGES", 3)
    assert _claimed(queue, "w", [CPU]) == ["plain"]
    assert queue.depth() == 2


def test_the_depth_is_counted_per_requested_target(db: Database, queue: DatabaseQueue) -> None:
    _enqueue(db, queue, "a")
    _enqueue(db, queue, "b")
    _enqueue(db, queue, "c", TargetRequest(gpu="sm_90", labels=["x"]), backend="tensorrt")
    depth = queue.depth_by_target()
    assert sorted(depth, key=lambda q: q.jobs) == [
        QueuedTarget(
            requested_backend="tensorrt", target=TargetRequest(gpu="sm_90", labels=["x"]), jobs=1
        ),
        QueuedTarget(requested_backend="auto", target=None, jobs=2),
    ]


def test_worker_labels_come_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.errors import SettingsError
    from service.settings import load_settings

    monkeypatch.setenv("TRTFORGE_WORKER_LABELS", '["vision", "big"]')
    assert load_settings(data_dir=tmp_path).worker_labels == ["vision", "big"]
    monkeypatch.setenv("TRTFORGE_WORKER_LABELS", '["not a label"]')
    with pytest.raises(SettingsError) as refused:
        load_settings(data_dir=tmp_path)
    assert refused.value.field is not None and "worker_labels" in refused.value.field

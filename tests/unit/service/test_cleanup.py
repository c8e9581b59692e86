from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.db import Database
from service.settings import Settings
from service.store.cleanup import remove_orphans
from service.store.storage import Storage
from tests.unit.service.support import dataset_bytes, model_bytes


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_orphans_are_removed_after_the_grace_period(client: TestClient, settings: Settings) -> None:
    model = client.post("/v1/models", files={"file": ("t.onnx", model_bytes())}).json()
    client.post("/v1/datasets", files={"file": ("d.npz", dataset_bytes())})
    storage = Storage(settings.data_dir)
    orphan_model = storage.model_dir("b" * 64)
    orphan_model.mkdir()
    (orphan_model / "model.onnx").write_bytes(b"x")
    fresh_blob = storage.put_bytes(b"just published, row not committed yet")
    old_blob = storage.put_bytes(b"left by a crash")
    stale_work = storage.work_dir("deadbeef")
    stale_work.mkdir(parents=True)
    (stale_work / "artifact.onnx.tmp").write_bytes(b"partial")
    for path in (orphan_model, old_blob.path):
        _age(path, 7200)
    _age(storage.model_dir(model["id"]), 7200)

    db = Database(settings.resolved_database_url)
    removed = set(remove_orphans(db, storage, grace_s=3600))
    db.dispose()

    assert {orphan_model, old_blob.path, stale_work} <= removed
    assert not orphan_model.exists() and not old_blob.path.exists() and not stale_work.exists()
    assert fresh_blob.path.exists()  # within the grace period: may be committed any moment
    assert storage.model_dir(model["id"]).exists()
    assert client.get(f"/v1/models/{model['id']}").status_code == 200

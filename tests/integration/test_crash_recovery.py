"""kill -9 the server in the middle of a build, start it again: the build is re-queued once and
completes, and nothing partial is left in the data directory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import create_engine, text

from engines.spec import BuildSpec, Precision
from service.client import TrtforgeClient
from service.schemas import BenchmarkOptionsIn, BuildStatus
from tests.integration.conftest import Server
from tests.unit.service.support import DATABASES, database_url, dataset_bytes, model_bytes


def _referenced_blobs(url: str) -> set[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT artifact_sha256 FROM builds UNION SELECT report_sha256 FROM builds "
                "UNION SELECT blob_sha256 FROM calibration_tables"
            )
        ).scalars()
        found = {r for r in rows if r}
    engine.dispose()
    return found


def _wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", DATABASES)
def test_kill_9_during_a_build_then_restart(kind: str, tmp_path: Path) -> None:
    (tmp_path / "tiny.onnx").write_bytes(model_bytes())
    (tmp_path / "calib.npz").write_bytes(dataset_bytes(count=10))
    with database_url(kind, tmp_path) as url:
        server = Server(tmp_path / "data", url, tmp_path / "server.log")
        server.start()
        try:
            with TrtforgeClient(server.url) as client:
                model = client.upload_model(tmp_path / "tiny.onnx")
                data = client.upload_dataset(tmp_path / "calib.npz", model_id=model.id)
                build = client.submit_build(
                    model.id,
                    data.id,
                    BuildSpec(precision=Precision.INT8),
                    benchmark=BenchmarkOptionsIn(warmup_ms=0, iterations=1, duration_s=2.5),
                )
                for event in client.events(build.id):
                    if event.status is BuildStatus.BENCHMARKING:
                        break
            assert server.process is not None
            children = psutil.Process(server.process.pid).children(recursive=True)
            assert children, "the build should run in a child process"
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
            _wait_for(
                lambda: (
                    not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
                ),
                10,
                "the orphaned build process to die with its server",
            )
            assert (server.data_dir / "work" / build.id).exists()  # the interrupted attempt's

            server.start()
            with TrtforgeClient(server.url) as client:
                done = client.wait(build.id, timeout_s=120)
                assert done.status is BuildStatus.SUCCEEDED, done.error
                assert done.attempts == 2
                assert done.table_from_cache is True  # stored before the kill, reused after
                messages = [line.message for line in client.logs(build.id)]
                assert any(m.startswith("Re-queued") for m in messages)
                assert messages.count("Build started (attempt 2).") == 1
        finally:
            server.stop()

        data_dir = server.data_dir
        leftovers = [p for p in (data_dir / "tmp").rglob("*") if p.is_file()]
        assert leftovers == []
        assert list((data_dir / "work").iterdir()) == []
        assert not [p for p in data_dir.rglob("*") if p.name.endswith((".tmp", ".part"))]
        blobs = {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}
        assert blobs == _referenced_blobs(url)
        assert {p.name for p in (data_dir / "models").iterdir()} == {model.id}
        assert {p.name for p in (data_dir / "datasets").iterdir()} == {data.id}

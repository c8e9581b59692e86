"""Faults against real processes: ``kill -9`` of the server, of a separate worker and of the build
child at each stage, the database locked for seconds, the disk full. Every build ends
``succeeded`` after recovery or ``failed`` with a reason; none stays non-terminal; no orphan blob;
``/readyz`` tells the truth."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from engines.spec import BuildSpec, Precision
from service.client import TrtforgeClient
from service.errors import ApiError
from service.schemas import BenchmarkOptionsIn, BuildPublic, BuildStatus
from tests.integration.conftest import Server, start_worker
from tests.unit.service.support import DATABASES, database_url, dataset_bytes, model_bytes

pytestmark = pytest.mark.reliability

INT8 = BuildSpec(precision=Precision.INT8)
BENCH = BenchmarkOptionsIn(warmup_ms=0, iterations=1, duration_s=1.5)
STAGES = (BuildStatus.CALIBRATING, BuildStatus.BUILDING, BuildStatus.BENCHMARKING)


def _files(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    model, data = tmp_path / "tiny.onnx", tmp_path / "calib.npz"
    model.write_bytes(model_bytes(seed=seed))
    data.write_bytes(dataset_bytes(count=8, seed=seed))
    return model, data


def _submit(client: TrtforgeClient, model: Path, data: Path) -> BuildPublic:
    uploaded = client.upload_model(model)
    dataset = client.upload_dataset(data, model_id=uploaded.id)
    return client.submit_build(uploaded.id, dataset.id, INT8, benchmark=BENCH)


def _reach(client: TrtforgeClient, build_id: str, stage: BuildStatus) -> BuildStatus:
    """Follow the build until it reaches ``stage`` (or a later one); return where it is."""
    order = list(BuildStatus)
    for event in client.events(build_id):
        if event.status is None:  # a log line
            continue
        if event.status.terminal:
            raise AssertionError(f"the build ended ({event.status}) before {stage}")
        if order.index(event.status) >= order.index(stage):
            return event.status
    raise AssertionError("the event stream ended")


def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _build_children(pid: int) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(pid).children(recursive=True)
        if "service.worker.runner" in " ".join(child.cmdline())
    ]


def _no_orphans(data_dir: Path, url: str) -> None:
    """Every blob on disk is referenced; no temp or work files are left."""
    engine = create_engine(url)
    with engine.connect() as conn:
        referenced = {
            r
            for r in conn.execute(
                text(
                    "SELECT artifact_sha256 FROM builds UNION SELECT report_sha256 FROM builds "
                    "UNION SELECT blob_sha256 FROM calibration_tables"
                )
            ).scalars()
            if r
        }
    engine.dispose()
    blobs = {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}
    assert blobs <= referenced, f"orphan blobs: {blobs - referenced}"
    assert not [p for p in (data_dir / "tmp").rglob("*") if p.is_file()]
    assert list((data_dir / "work").iterdir()) == []


# every stage on SQLite, one on PostgreSQL (recovery is the same code; CI time is bounded)
_SERVER_KILLS = [("sqlite", stage) for stage in STAGES] + [
    (kind, BuildStatus.BENCHMARKING) for kind in DATABASES if kind != "sqlite"
]


@pytest.mark.parametrize(
    ("kind", "stage"), _SERVER_KILLS, ids=[f"{k}-{s.value}" for k, s in _SERVER_KILLS]
)
def test_kill_9_of_the_server_at_each_stage_then_restart(
    kind: str, stage: BuildStatus, tmp_path: Path
) -> None:
    model, data = _files(tmp_path)
    with database_url(kind, tmp_path) as url:
        server = Server(tmp_path / "data", url, tmp_path / "server.log")
        server.start()
        try:
            with TrtforgeClient(server.url) as client:
                build = _submit(client, model, data)
                _reach(client, build.id, stage)
            assert server.process is not None
            children = _build_children(server.process.pid)
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
            _until(
                lambda: not any(c.is_running() and c.status() != "zombie" for c in children),
                15,
                "the orphaned build process to die with its server",
            )
            server.start()
            with TrtforgeClient(server.url) as client:
                done = client.wait(build.id, timeout_s=120)
                assert done.status is BuildStatus.SUCCEEDED, done.error
                assert done.attempts == 2
                if stage is not BuildStatus.CALIBRATING:
                    assert done.table_from_cache is True  # stored before the kill, reused after
                messages = [line.message for line in client.logs(build.id)]
                assert any(m.startswith("Re-queued") for m in messages)
                assert messages.count("Build started (attempt 2).") == 1
                assert client.readyz().ready
        finally:
            server.stop()
        _no_orphans(server.data_dir, url)


@pytest.mark.parametrize("kind", DATABASES)  # PostgreSQL: Procrastinate's stalled jobs
def test_kill_9_of_a_separate_worker_mid_build(kind: str, tmp_path: Path) -> None:
    model, data = _files(tmp_path, seed=1)
    with database_url(kind, tmp_path) as url:
        server = Server(
            tmp_path / "data", url, tmp_path / "server.log", env={"TRTFORGE_WORKERS": "0"}
        )
        server.start(ready_path="/healthz")
        first = second = None
        try:
            with TrtforgeClient(server.url) as client:
                first = start_worker(url, server.data_dir, tmp_path / "w1.log")
                build = _submit(client, model, data)
                _reach(client, build.id, BuildStatus.BUILDING)
                children = _build_children(first.pid)
                first.kill()
                first.wait(10)
                _until(
                    lambda: not any(c.is_running() and c.status() != "zombie" for c in children),
                    15,
                    "the build process to die with its worker",
                )
                # the dead worker is not live: readyz says so once its heartbeat is stale
                _until(lambda: not client.readyz().ready, 30, "readyz to notice the dead worker")
                second = start_worker(url, server.data_dir, tmp_path / "w2.log")
                done = client.wait(build.id, timeout_s=120)
                assert done.status is BuildStatus.SUCCEEDED, done.error
                assert done.attempts == 2
                assert client.readyz().ready
        finally:
            for worker in (first, second):
                if worker is not None and worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
                    worker.wait(30)
            server.stop()
        _no_orphans(server.data_dir, url)


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
def test_kill_9_of_the_build_child_fails_the_build_with_a_reason(
    stage: BuildStatus, tmp_path: Path
) -> None:
    model, data = _files(tmp_path, seed=2)
    with database_url("sqlite", tmp_path) as url:
        server = Server(tmp_path / "data", url, tmp_path / "server.log")
        server.start()
        try:
            with TrtforgeClient(server.url) as client:
                build = _submit(client, model, data)
                _reach(client, build.id, stage)
                assert server.process is not None
                for child in _build_children(server.process.pid):
                    child.kill()
                done = client.wait(build.id, timeout_s=60)
                assert done.status is BuildStatus.FAILED
                assert done.error is not None and done.error.code == "build_crashed"
                assert "signal 9" in done.error.message and done.error.hint
                # the worker lives on: the same request again builds
                again = client.submit_build(build.model_id, build.dataset_id, INT8, benchmark=BENCH)
                assert client.wait(again.id, timeout_s=120).status is BuildStatus.SUCCEEDED
                assert client.readyz().ready
        finally:
            server.stop()
        _no_orphans(server.data_dir, url)


def test_the_database_locked_for_seconds_mid_build(tmp_path: Path) -> None:
    model, data = _files(tmp_path, seed=3)
    with database_url("sqlite", tmp_path) as url:
        server = Server(tmp_path / "data", url, tmp_path / "server.log")
        server.start()
        try:
            with TrtforgeClient(server.url) as client:
                build = _submit(client, model, data)
                _reach(client, build.id, BuildStatus.CALIBRATING)
                path = url.removeprefix("sqlite:///")
                lock = sqlite3.connect(path, timeout=10)
                lock.execute("BEGIN EXCLUSIVE")  # every writer waits (or fails) for 6 s
                time.sleep(6)
                lock.rollback()
                lock.close()
                done = client.wait(build.id, timeout_s=120)
                assert done.status.terminal
                if done.status is BuildStatus.FAILED:  # allowed, with a reason
                    assert done.error is not None and done.error.code and done.error.hint
                _until(lambda: client.readyz().ready, 30, "readyz after the lock")
                again = client.submit_build(build.model_id, build.dataset_id, INT8, benchmark=BENCH)
                assert client.wait(again.id, timeout_s=120).status.terminal
        finally:
            server.stop()


@contextlib.contextmanager
def _tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the file system of ``folder`` up to ``leave_bytes`` free."""
    filler = folder / "filler.bin"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    # unbuffered: a buffered file would flush what the full disk refused again as it closes,
    # outside the suppress
    with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_a_full_disk_answers_507_fails_builds_with_a_reason_and_recovers(tmp_path: Path) -> None:
    model, data = _files(tmp_path, seed=4)
    with _tmpfs(tmp_path / "disk", 48) as disk:
        url = f"sqlite:///{disk / 'trtforge.db'}"
        server = Server(disk / "data", url, tmp_path / "server.log")
        server.start()
        try:
            with TrtforgeClient(server.url) as client:
                uploaded = client.upload_model(model)
                dataset = client.upload_dataset(data, model_id=uploaded.id)
                other = tmp_path / "other.onnx"
                other.write_bytes(model_bytes(seed=5))
                filler = _fill(disk, 0)
                with pytest.raises(ApiError) as refused:
                    client.upload_model(other)
                assert refused.value.status_code == 507, refused.value  # insufficient storage
                submitted = None
                with contextlib.suppress(ApiError):  # queueing may itself need disk
                    submitted = client.submit_build(uploaded.id, dataset.id, INT8, benchmark=BENCH)
                readiness = httpx.get(f"{server.url}/readyz", timeout=10)
                assert readiness.status_code == 503  # the data directory is not writable
                assert not readiness.json()["checks"]["storage"]["ok"]
                if submitted is not None:
                    done = client.wait(submitted.id, timeout_s=120)
                    assert done.status is BuildStatus.FAILED and done.error is not None
                    assert done.error.code and done.error.hint
                filler.unlink()
                _until(lambda: client.readyz().ready, 30, "readyz once space is back")
                build = client.submit_build(uploaded.id, dataset.id, INT8, benchmark=BENCH)
                assert client.wait(build.id, timeout_s=120).status is BuildStatus.SUCCEEDED
                assert server.process is not None and server.process.poll() is None
        finally:
            server.stop()

"""``trtforge serve --workers 0`` plus a ``trtforge worker`` process on the same database (SQLite with
the database queue; PostgreSQL with Procrastinate's, ``TRTFORGE_QUEUE=auto``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.tensorrt import tensorrt_installed
from engines.spec import BackendName, BuildSpec, Precision
from service.client import TrtforgeClient
from service.errors import ApiError
from service.schemas import AccuracyOptions, BenchmarkOptionsIn, BuildStatus
from tests.integration.conftest import ROOT, Server, start_worker
from tests.unit.service.support import DATABASES, database_url, dataset_bytes, model_bytes


@pytest.mark.parametrize("kind", DATABASES)
def test_builds_run_in_a_separate_worker_process(kind: str, tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(model_bytes(seed=3))
    (tmp_path / "d.npz").write_bytes(dataset_bytes(count=4, seed=3))
    with database_url(kind, tmp_path) as url:
        server = Server(
            tmp_path / "data", url, tmp_path / "server.log", env={"TRTFORGE_WORKERS": "0"}
        )
        server.start(ready_path="/healthz")
        worker = None
        try:
            readiness = httpx.get(f"{server.url}/readyz")
            assert readiness.status_code == 503
            assert not readiness.json()["checks"]["workers"]["ok"]
            with TrtforgeClient(server.url) as client:
                model = client.upload_model(tmp_path / "m.onnx")
                data = client.upload_dataset(tmp_path / "d.npz")
                build = client.submit_build(
                    model.id,
                    data.id,
                    BuildSpec(precision=Precision.FP32),
                    benchmark=BenchmarkOptionsIn(warmup_ms=0, iterations=2, duration_s=0),
                    accuracy=AccuracyOptions(enabled=False),
                )
                time.sleep(1.0)
                assert client.get_build(build.id).status is BuildStatus.QUEUED
                env = {
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "TRTFORGE_DATA_DIR": str(server.data_dir),
                    "TRTFORGE_DATABASE_URL": url,
                    "TRTFORGE_POLL_INTERVAL_S": "0.2",
                    "TRTFORGE_HEARTBEAT_S": "0.5",
                    "TRTFORGE_STALE_AFTER_S": "5",
                }
                with (tmp_path / "worker.log").open("wb") as log:
                    worker = subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            "from service.cli.main import main; main()",
                            "worker",
                            "--slots",
                            "1",
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                done = client.wait(build.id, timeout_s=120)
                assert done.status is BuildStatus.SUCCEEDED, (tmp_path / "worker.log").read_text()
                assert client.readyz().ready
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
                worker.wait(30)
            server.stop()
        assert worker.returncode == 0


H100 = (
    '[{"backend": "tensorrt", "backend_version": "10.13.0", "compute_capability": "9.0", '
    '"device": "NVIDIA H100 80GB HBM3"}]'
)


def _wait_for_workers(client: TrtforgeClient, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if client.readyz().checks["workers"].detail.startswith(f"{count} live"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} workers did not register: {client.readyz()}")


@pytest.mark.parametrize("kind", DATABASES)
def test_the_worker_decides_the_target_not_the_api_host(kind: str, tmp_path: Path) -> None:
    # A CPU-only API (no TensorRT, no GPU) with a CPU worker and a worker whose configuration
    # says it builds TensorRT 10.13 engines for an H100 (the way a deployment declares a target).
    (tmp_path / "m.onnx").write_bytes(model_bytes(seed=4))
    (tmp_path / "d.npz").write_bytes(dataset_bytes(count=4, seed=4))
    spec = BuildSpec(precision=Precision.FP16, backend=BackendName.TENSORRT)
    options = {
        "benchmark": BenchmarkOptionsIn(warmup_ms=0, iterations=2, duration_s=0),
        "accuracy": AccuracyOptions(enabled=False),
    }
    workers: list[subprocess.Popen[bytes]] = []
    with database_url(kind, tmp_path) as url:
        server = Server(
            tmp_path / "data", url, tmp_path / "server.log", env={"TRTFORGE_WORKERS": "0"}
        )
        server.start(ready_path="/healthz")
        try:
            with TrtforgeClient(server.url) as client:
                model = client.upload_model(tmp_path / "m.onnx")
                data = client.upload_dataset(tmp_path / "d.npz")
                workers.append(start_worker(url, server.data_dir, tmp_path / "cpu.log"))
                _wait_for_workers(client, 1)
                with pytest.raises(ApiError) as refused:
                    client.submit_build(model.id, data.id, spec, **options)
                assert refused.value.status_code == 422 and refused.value.remote_code == "no_target"
                assert "onnxruntime" in refused.value.message  # the live targets are listed

                workers.append(
                    start_worker(
                        url,
                        server.data_dir,
                        tmp_path / "gpu.log",
                        TRTFORGE_WORKER_TARGETS=H100,
                    )
                )
                _wait_for_workers(client, 2)
                queued = client.submit_build(model.id, data.id, spec, **options)
                assert queued.requested_backend == "tensorrt" and queued.backend in (
                    None,
                    "tensorrt",
                )
                done = client.wait(queued.id, timeout_s=120)
                assert (done.backend, done.backend_version, done.compute_capability) == (
                    "tensorrt",
                    "10.13.0",
                    "9.0",
                )
                assert done.worker_id is not None
                claimed = [
                    line.message for line in client.logs(queued.id) if "Claimed" in line.message
                ]
                assert claimed == [
                    f"Claimed by worker {done.worker_id}: building for tensorrt 10.13.0 "
                    "(NVIDIA H100 80GB HBM3, sm 9.0)."
                ]
                if not tensorrt_installed():
                    # the declared target is honoured, and the missing library said plainly
                    assert done.status is BuildStatus.FAILED
                    assert done.error is not None and done.error.code == "backend_unavailable"
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
                worker.wait(30)
            server.stop()

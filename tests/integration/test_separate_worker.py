"""``trtforge serve --workers 0`` plus a ``trtforge worker`` process on the same database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from engines.spec import BuildSpec, Precision
from service.client import TrtforgeClient
from service.schemas import AccuracyOptions, BenchmarkOptionsIn, BuildStatus
from tests.integration.conftest import ROOT, Server
from tests.unit.service.support import database_url, dataset_bytes, model_bytes


def test_builds_run_in_a_separate_worker_process(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(model_bytes(seed=3))
    (tmp_path / "d.npz").write_bytes(dataset_bytes(count=4, seed=3))
    with database_url("sqlite", tmp_path) as url:
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

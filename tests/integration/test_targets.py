"""Builds routed by target between two ``trtforge worker`` processes: one labelled on its command
line, one whose GPU description and labels come from its configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from engines.spec import BuildSpec, Precision
from service.client import TrtforgeClient
from service.errors import ApiError
from service.schemas import (
    AccuracyOptions,
    BenchmarkOptionsIn,
    BuildStatus,
    TargetRequest,
    WorkerPublic,
)
from tests.integration.conftest import L4_TARGETS, ROOT, Server, start_worker
from tests.unit.service.support import DATABASES, database_url, dataset_bytes, model_bytes


def _live_workers(server: Server, count: int) -> dict[str, str]:
    """Worker id by its labels (joined), once ``count`` workers are live."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = httpx.get(f"{server.url}/v1/workers")
        workers = [WorkerPublic.model_validate(w) for w in answer.raise_for_status().json()]
        if len(workers) == count:
            return {",".join(worker.labels): worker.id for worker in workers}
        time.sleep(0.2)
    raise AssertionError(f"{count} workers did not register")


def _submit_cli(server: Server, model: Path, data: Path, *options: str) -> dict[str, object]:
    """``trtforge submit --json`` (without waiting)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from service.cli.main import main; main()",
            "submit",
            str(model),
            "--data",
            str(data),
            "--precision",
            "fp32",
            "--json",
            "--server",
            server.url,
            *options,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
        check=True,
    )
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def _procrastinate_jobs_end(url: str, expected: dict[str, str]) -> None:
    """Wait until Procrastinate's jobs (TRTFORGE_QUEUE=auto on PostgreSQL) have the ``expected``
    status by build id (a worker finishes a job just after its build records its outcome)."""
    engine = create_engine(url)
    jobs: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and jobs != expected:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT lock, status::text FROM procrastinate_jobs"))
                jobs = {str(lock): str(status) for lock, status in rows}
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert jobs == expected


@pytest.mark.parametrize("kind", DATABASES)
def test_targeted_builds_go_only_to_the_matching_worker(kind: str, tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(model_bytes(seed=5))
    (tmp_path / "d.npz").write_bytes(dataset_bytes(count=4, seed=5))
    spec = BuildSpec(precision=Precision.FP32)
    benchmark = BenchmarkOptionsIn(warmup_ms=0, iterations=2, duration_s=0)
    fast = {"accuracy": AccuracyOptions(enabled=False), "benchmark": benchmark}
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
                args = ("--slots", "1", "--label", "vision", "--label", "big")
                workers.append(start_worker(url, server.data_dir, tmp_path / "a.log", *args))
                workers.append(
                    start_worker(
                        url,
                        server.data_dir,
                        tmp_path / "b.log",
                        "--slots",
                        "1",
                        TRTFORGE_WORKER_TARGETS=L4_TARGETS,
                        TRTFORGE_WORKER_LABELS='["edge"]',
                    )
                )
                ids = _live_workers(server, 2)
                assert set(ids) == {"big,vision", "edge"}
                labelled, l4 = ids["big,vision"], ids["edge"]

                with pytest.raises(ApiError) as refused:
                    impossible = TargetRequest(labels=["vision", "edge"])
                    client.submit_build(model.id, data.id, spec, target=impossible, **fast)
                assert (refused.value.status_code, refused.value.remote_code) == (422, "no_target")
                assert "[labels: big, vision]" in refused.value.message
                assert "(NVIDIA L4, sm 8.9) [labels: edge]" in refused.value.message

                expected: dict[str, str | None] = {}
                for target, worker in (
                    (TargetRequest(labels=["vision"]), labelled),
                    (TargetRequest(gpu="L4"), l4),
                    (TargetRequest(gpu="sm_89", labels=["edge"]), l4),
                    (TargetRequest(labels=["big", "vision"]), labelled),
                ):
                    build = client.submit_build(model.id, data.id, spec, target=target, **fast)
                    assert build.requested_target == target
                    expected[build.id] = worker
                for seed in (1, 2, 3):  # untargeted: either worker
                    options = AccuracyOptions(enabled=False, seed=seed)
                    build = client.submit_build(
                        model.id, data.id, spec, accuracy=options, benchmark=benchmark
                    )
                    assert build.requested_target is None
                    expected[build.id] = None
                submitted = _submit_cli(
                    server,
                    tmp_path / "m.onnx",
                    tmp_path / "d.npz",
                    "--target-label",
                    "edge",
                    "--target-gpu",
                    "L4",
                )
                assert submitted["requested_target"] == {
                    "gpu": "L4",
                    "tensorrt": None,
                    "labels": ["edge"],
                }
                expected[str(submitted["id"])] = l4

                for build_id, worker in expected.items():
                    done = client.wait(build_id, timeout_s=180)
                    assert done.status is BuildStatus.SUCCEEDED, (done.error, build_id)
                    assert done.worker_id == worker if worker else done.worker_id in (labelled, l4)
                    if done.worker_id == l4:
                        assert (done.backend, done.compute_capability) == ("onnxruntime", "8.9")
                    else:
                        assert (done.backend, done.compute_capability) == ("onnxruntime", "cpu")
                if kind != "sqlite":  # PostgreSQL: every build went through Procrastinate's queue
                    _procrastinate_jobs_end(url, dict.fromkeys(expected, "succeeded"))
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
                worker.wait(30)
            server.stop()
    assert [worker.returncode for worker in workers] == [0, 0]


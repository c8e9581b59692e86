"""Workers on other machines: ``trtforge worker --api URL --token T --data-dir DIR`` processes
that share no filesystem and no database with the API (issue 12, item 3).

The API runs without in-process workers and with tokens required; each worker has its own data
directory and a ``worker`` token. One worker carries a label on its command line (and builds on
this machine's CPU); the other describes an L4 GPU machine through its configuration. Builds go by
target, an impossible target is refused, a worker killed with ``kill -9`` in the middle of a build
has that build re-queued onto a live worker of the same target, and every artifact downloads from
the API with its sha256. A worker whose token lacks the ``worker`` scope takes no builds and says
why.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engines.spec import BuildSpec, Precision
from service.api.auth import create_token
from service.client import TrtforgeClient
from service.db import Database
from service.errors import ApiError
from service.schemas import (
    AccuracyOptions,
    BenchmarkOptionsIn,
    BuildPublic,
    BuildStatus,
    Scope,
    TargetRequest,
    WorkerPublic,
)
from service.settings import Settings
from tests.integration.conftest import L4_TARGETS, ROOT, Server
from tests.unit.service.support import DATABASES, database_url, dataset_bytes, model_bytes

FAST = BenchmarkOptionsIn(warmup_ms=0, iterations=2, duration_s=0)
SLOW = BenchmarkOptionsIn(warmup_ms=0, iterations=100_000, duration_s=5)
"""A build that benchmarks for 5 s: long enough to kill its worker in the middle of it."""


def start_remote_worker(
    api: str, token: str, data_dir: Path, log_path: Path, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    """``trtforge worker --api`` with its own data directory and no database setting."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRTFORGE_")}
    environment |= {
        "PYTHONPATH": str(ROOT),
        "TRTFORGE_POLL_INTERVAL_S": "0.2",
        "TRTFORGE_HEARTBEAT_S": "0.5",
        "TRTFORGE_STALE_AFTER_S": "5",
        **env,
    }
    command = ["worker", "--api", api, "--token", token, "--data-dir", str(data_dir), *args]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", "from service.cli.main import main; main()", *command],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _tokens(server: Server) -> tuple[str, str, str]:
    """(build token, worker token, read token) in the server's database."""
    settings = Settings(data_dir=server.data_dir, database_url=server.database_url)
    db = Database.from_settings(settings)
    try:
        with db.session() as session:
            made = [create_token(session, scope.value, scope)[1] for scope in Scope]
    finally:
        db.dispose()
    by_scope = dict(zip(Scope, made, strict=True))
    return by_scope[Scope.BUILD], by_scope[Scope.WORKER], by_scope[Scope.READ]


def _live(server: Server, token: str, count: int) -> dict[str, str]:
    """Worker id by its labels (joined), once exactly ``count`` workers are live."""
    deadline = time.monotonic() + 60
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        answer = httpx.get(f"{server.url}/v1/workers", headers=headers).raise_for_status()
        workers = [WorkerPublic.model_validate(w) for w in answer.json()]
        if len(workers) == count:
            return {",".join(worker.labels): worker.id for worker in workers}
        time.sleep(0.2)
    raise AssertionError(f"{count} workers did not register:\n{server.log()}")


def _wait_for(check: object, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.mark.parametrize("kind", DATABASES)
def test_workers_without_a_shared_filesystem(kind: str, tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(model_bytes(seed=7))
    (tmp_path / "d.npz").write_bytes(dataset_bytes(count=4, seed=7))
    spec = BuildSpec(precision=Precision.FP32)
    workers: dict[str, subprocess.Popen[bytes]] = {}
    with database_url(kind, tmp_path) as url:
        server = Server(
            tmp_path / "api",
            url,
            tmp_path / "server.log",
            env={"TRTFORGE_WORKERS": "0", "TRTFORGE_AUTH": "true"},
        )
        server.start(ready_path="/healthz")
        try:
            build_token, worker_token, read_token = _tokens(server)

            def worker(name: str, *args: str, token: str = worker_token, **env: str) -> None:
                workers[name] = start_remote_worker(
                    server.url,
                    token,
                    tmp_path / f"worker-{name}",
                    tmp_path / f"{name}.log",
                    "--slots",
                    "1",
                    *args,
                    **env,
                )

            with TrtforgeClient(server.url, build_token) as client:
                model = client.upload_model(tmp_path / "m.onnx")
                data = client.upload_dataset(tmp_path / "d.npz")

                # a read token is refused: that worker takes nothing and says why
                worker("reader", "--label", "reader", token=read_token)
                worker("cpu", "--label", "vision")
                worker("l4", TRTFORGE_WORKER_TARGETS=L4_TARGETS, TRTFORGE_WORKER_LABELS='["edge"]')
                ids = _live(server, build_token, 2)
                assert set(ids) == {"vision", "edge"}
                cpu, l4 = ids["vision"], ids["edge"]
                reader_log = tmp_path / "reader.log"
                _wait_for(lambda: "--scope worker" in reader_log.read_text(), "the refusal")
                assert "this worker takes no builds" in reader_log.read_text()
                assert workers["reader"].poll() is None  # it keeps checking, takes nothing

                with pytest.raises(ApiError) as refused:
                    impossible = TargetRequest(labels=["vision", "edge"])
                    client.submit_build(model.id, data.id, spec, target=impossible, benchmark=FAST)
                assert (refused.value.status_code, refused.value.remote_code) == (422, "no_target")

                expected: dict[str, str | None] = {}
                for target, owner in (
                    (TargetRequest(labels=["vision"]), cpu),
                    (TargetRequest(gpu="L4"), l4),
                    (TargetRequest(gpu="sm_89", labels=["edge"]), l4),
                ):
                    build = client.submit_build(
                        model.id,
                        data.id,
                        spec,
                        target=target,
                        benchmark=FAST,
                        accuracy=AccuracyOptions(enabled=False),
                    )
                    expected[build.id] = owner
                for seed in (1, 2, 3):  # untargeted: either worker
                    build = client.submit_build(
                        model.id,
                        data.id,
                        spec,
                        benchmark=FAST,
                        accuracy=AccuracyOptions(enabled=True, seed=seed, eval_fraction=0.5),
                    )
                    expected[build.id] = None
                done: list[BuildPublic] = []
                for build_id, owner in expected.items():
                    result = client.wait(build_id, timeout_s=120)
                    assert result.status is BuildStatus.SUCCEEDED, (result.error, build_id)
                    assert result.worker_id == owner if owner else result.worker_id in (cpu, l4)
                    place = "8.9" if result.worker_id == l4 else "cpu"
                    assert (result.backend, result.compute_capability) == ("onnxruntime", place)
                    done.append(result)
                for result in done:  # every artifact from the API, with its sha256
                    assert result.artifact is not None
                    path = client.download_artifact(result.id, tmp_path / "downloads" / result.id)
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    assert digest == result.artifact.sha256
                    assert client.report(result.id).artifact.sha256 == digest

                # kill -9 of the L4 worker in the middle of a build: a new L4 worker finishes it
                slow = client.submit_build(
                    model.id,
                    data.id,
                    spec,
                    target=TargetRequest(gpu="L4"),
                    benchmark=SLOW,
                    accuracy=AccuracyOptions(enabled=False),
                )
                _wait_for(
                    lambda: client.get_build(slow.id).status is BuildStatus.BENCHMARKING,
                    "the slow build to benchmark",
                )
                assert client.get_build(slow.id).worker_id == l4
                workers["l4"].send_signal(signal.SIGKILL)
                workers["l4"].wait(10)
                worker(
                    "l4-again", TRTFORGE_WORKER_TARGETS=L4_TARGETS, TRTFORGE_WORKER_LABELS='["edge"]'
                )
                result = client.wait(slow.id, timeout_s=120)
                assert result.status is BuildStatus.SUCCEEDED, result.error
                assert result.worker_id not in (l4, cpu)
                assert result.compute_capability == "8.9"
                lines = [line.message for line in client.logs(slow.id)]
                assert any(line.startswith("Re-queued") for line in lines), lines
                assert "Build started (attempt 2)." in lines
                assert result.artifact is not None
                path = client.download_artifact(slow.id, tmp_path / "downloads" / slow.id)
                assert hashlib.sha256(path.read_bytes()).hexdigest() == result.artifact.sha256

                # a cancel reaches the build on its worker, which records it through the API
                doomed = client.submit_build(
                    model.id,
                    data.id,
                    spec,
                    target=TargetRequest(labels=["vision"]),
                    benchmark=SLOW,
                    accuracy=AccuracyOptions(enabled=False, seed=9),
                )
                _wait_for(
                    lambda: client.get_build(doomed.id).status is BuildStatus.BENCHMARKING,
                    "the build to cancel to benchmark",
                )
                client.cancel_build(doomed.id)
                cancelled = client.wait(doomed.id, timeout_s=60)
                assert (cancelled.status, cancelled.worker_id) == (BuildStatus.CANCELLED, cpu)

            # the inputs were cached in each worker's own data directory, by their ids
            for name in ("cpu", "l4"):
                folder = tmp_path / f"worker-{name}"
                assert (folder / "models" / model.id).is_dir()
                assert (folder / "datasets" / data.id).is_dir()
                assert not any((folder / "blobs").iterdir())  # results went to the API
            assert not (tmp_path / "worker-reader" / "models").exists() or not any(
                (tmp_path / "worker-reader" / "models").iterdir()
            )
        finally:
            codes = {name: _stop(process) for name, process in workers.items()}
            server.stop()
    assert codes["cpu"] == 0, (tmp_path / "cpu.log").read_text()[-3000:]
    assert codes["l4-again"] == 0, (tmp_path / "l4-again.log").read_text()[-3000:]

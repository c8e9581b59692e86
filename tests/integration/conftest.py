"""A real trtforge server (``trtforge serve`` under uvicorn) in a subprocess on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from tests.unit.service.support import DATABASES, database_url

ROOT = Path(__file__).resolve().parents[2]

L4_TARGETS = json.dumps(
    [
        {
            "backend": "onnxruntime",
            "backend_version": version("onnxruntime"),
            "compute_capability": "8.9",
            "device": "NVIDIA L4",
        }
    ]
)
"""``TRTFORGE_WORKER_TARGETS`` of a worker that builds on this machine's CPU with ONNX Runtime
while its configuration describes an L4 GPU machine (targeted routing)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """One ``trtforge serve`` process; restartable on the same data directory and database."""

    data_dir: Path
    database_url: str | None
    """None: the server's default (SQLite in its data directory)."""
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    root: Path = ROOT
    """The checkout it runs from (bench/api_load.py runs an older one for its baseline)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0, *, ready_path: str = "/readyz") -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(self.root),
            "TRTFORGE_DATA_DIR": str(self.data_dir),
            **({"TRTFORGE_DATABASE_URL": self.database_url} if self.database_url else {}),
            "TRTFORGE_PORT": str(self.port),
            "TRTFORGE_WORKERS": "1",
            "TRTFORGE_POLL_INTERVAL_S": "0.2",
            "TRTFORGE_HEARTBEAT_S": "0.5",
            "TRTFORGE_STALE_AFTER_S": "5",
            "TRTFORGE_CANCEL_GRACE_S": "2",
            **self.env,
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from service.cli.main import main; main()",
                "serve",
                "--log-level",
                "warning",
            ],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}{ready_path}", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"the server did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def start_worker(
    database_url: str, data_dir: Path, log_path: Path, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    """A ``trtforge worker`` process against the same database and data directory (``args``:
    its command-line options, ``env``: more ``TRTFORGE_*`` settings)."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TRTFORGE_DATA_DIR": str(data_dir),
        "TRTFORGE_DATABASE_URL": database_url,
        "TRTFORGE_POLL_INTERVAL_S": "0.2",
        "TRTFORGE_HEARTBEAT_S": "0.5",
        "TRTFORGE_STALE_AFTER_S": "5",
        **env,
    }
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", "from service.cli.main import main; main()", "worker", *args],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@contextlib.contextmanager
def running_server(kind: str, folder: Path, **env: str) -> Iterator[Server]:
    with database_url(kind, folder) as url:
        server = Server(folder / "data", url, folder / "server.log", env=dict(env))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server shared by a module's tests (uploads limited to 2 MiB)."""
    folder = tmp_path_factory.mktemp("server")
    with running_server(request.param, folder, TRTFORGE_MAX_UPLOAD_BYTES=str(2 << 20)) as srv:
        yield srv

"""Issue 11, defect 3: many concurrent pollers against a real ``trtforge serve`` while a build runs.

Starts a server (uvicorn, SQLite in a temporary data directory, ``--workers`` in-process build
slots) from ``--root`` (this checkout by default; point it at a worktree of an older commit to
measure the code before a change), uploads the test zoo's tiny CNN and a dataset, builds it once
(so a report exists), submits an FP16 build whose benchmark outlasts the load, then runs
``--clients`` pollers (tests/reliability/loadgen.py: one ``httpx.AsyncClient`` each; status then
report, ``If-None-Match`` with the last ETag unless ``--no-etags``, ``--interval-s`` between
rounds) and ``--sse`` event-stream listeners for ``--duration-s``. Any answer other than 200/304,
transport error or timeout (``--timeout-s``) is an error. After the load a new INT8 build is
submitted and must finish (the queue is alive). One fresh server per ``--interval-s`` value.

    python bench/api_load.py [--root DIR] [--clients 500] [--sse 0] [--duration-s 30]
        [--interval-s 1 ...] [--timeout-s 30] [--workers 2] [--env TRTFORGE_X=V ...]
        [--label after] [--output api_load]

Prints the rows as JSON; with ``--output`` appends them under ``--label`` in
bench/results/<output>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reliability.loadgen import (  # noqa: E402
    EventsResult,
    LoadResult,
    listen_events,
    poll_load,
    prepare_builds,
    submit_build,
    wait_for_build,
)

__all__ = ["ServerProcess", "measure", "running_server"]

RESULTS = ROOT / "bench" / "results"
_SERVE = "from service.cli.main import main; main()"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """``trtforge serve`` from the checkout at ``root``, on a free port."""

    root: Path
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(self.root),
            "TRTFORGE_DATA_DIR": str(self.data_dir),
            "TRTFORGE_PORT": str(self.port),
            "TRTFORGE_POLL_INTERVAL_S": "0.2",
            "TRTFORGE_HEARTBEAT_S": "0.5",
            "TRTFORGE_STALE_AFTER_S": "5",
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SERVE, "serve", "--log-level", "warning"],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start:\n{self.log()}")

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


@contextlib.contextmanager
def running_server(root: Path, folder: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    server = ServerProcess(root, folder / "data", folder / "server.log", env=env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _load(
    url: str, running: str, done: str, args: argparse.Namespace, interval_s: float
) -> tuple[LoadResult, EventsResult]:
    polls = poll_load(
        url,
        running,
        done,
        clients=args.clients,
        duration_s=args.duration_s,
        interval_s=interval_s,
        timeout_s=args.timeout_s,
        etags=not args.no_etags,
    )
    streams = listen_events(url, running, streams=args.sse, duration_s=args.duration_s)
    return await asyncio.gather(polls, streams)


def measure(args: argparse.Namespace, interval_s: float) -> dict[str, Any]:
    """One server, one build running, ``args.clients`` pollers every ``interval_s``."""
    env = {"TRTFORGE_WORKERS": str(args.workers)}
    env |= dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="trtforge-load-") as tmp:
        folder = Path(tmp)
        with running_server(args.root.resolve(), folder, env) as server:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                ids, done, running = prepare_builds(client, args.duration_s + 10)
            started = time.monotonic()
            load, events = asyncio.run(_load(server.url, running, done, args, interval_s))
            wall = time.monotonic() - started
            print(json.dumps(load.summary()), file=sys.stderr, flush=True)
            after_start = time.monotonic()
            with httpx.Client(base_url=server.url, timeout=args.after_timeout_s) as client:
                try:
                    after = submit_build(client, ids, spec={"precision": "int8"})
                    after_status = wait_for_build(client, after, args.after_timeout_s)["status"]
                except (TimeoutError, RuntimeError, httpx.TransportError) as exc:
                    after_status = f"not finished: {type(exc).__name__}: {exc}"
            after_s = time.monotonic() - after_start
    return {
        "root": str(args.root),
        "commit": _commit(args.root),
        "server_env": env,
        "load": load.summary(),
        "event_streams": {
            "streams": events.streams,
            "events": dict(events.events),
            "ended": events.ended,
            "errors": dict(events.errors),
        },
        "load_wall_s": round(wall, 2),
        "build_after_load": {"status": after_status, "seconds": round(after_s, 2)},
        "machine": {"logical_cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _commit(root: Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout to run the server from")
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--sse", type=int, default=0, help="event-stream listeners besides")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--interval-s", type=float, nargs="+", default=[1.0])
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--after-timeout-s", type=float, default=180.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-etags", action="store_true")
    parser.add_argument("--env", nargs="*", default=[], help="TRTFORGE_X=V for the server")
    parser.add_argument("--label", default="after")
    parser.add_argument("--output", default=None, help="merge into bench/results/<output>.json")
    args = parser.parse_args(argv)
    rows = [measure(args, interval) for interval in args.interval_s]
    print(json.dumps(rows, indent=2))
    if args.output:
        path = RESULTS / f"{args.output}.json"
        merged: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        merged.setdefault(args.label, []).extend(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

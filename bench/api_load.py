"""Issue 11, defect 3: many concurrent pollers against a real ``trtforge serve`` while a build runs.

Starts a server (uvicorn, SQLite in a temporary data directory, one in-process build slot per
``--workers``) from ``--root`` (this checkout by default; point it at a worktree of an older
commit to measure the code before a change), uploads the test zoo's tiny CNN and a dataset,
builds it once (so a report exists), submits a longer build that runs during the load (its
benchmark lasts about as long as the load), then ``--clients`` asyncio pollers (one shared
``httpx.AsyncClient``) each repeat, for ``--duration-s`` seconds: ``GET /v1/builds/{running}``
then ``GET /v1/builds/{done}/report``, sleeping ``--interval-s`` between rounds, sending the last
``ETag`` as ``If-None-Match`` (unless ``--no-etags``). Every answer other than 200/304 and every
transport error or timeout (``--timeout-s``) counts as an error. After the load, a new build is
submitted and must finish (the queue is alive).

    python bench/api_load.py [--root DIR] [--clients 500] [--duration-s 30] [--interval-s 1]
        [--timeout-s 30] [--workers 2] [--env TRTFORGE_X=V ...] [--label NAME] [--output api_load]

Prints one JSON object; with ``--output`` merges it under ``--label`` into
bench/results/<output>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.unit.service.support import dataset_bytes, model_bytes  # noqa: E402

__all__ = [
    "LoadResult",
    "ServerProcess",
    "poll_load",
    "prepare_builds",
    "submit_build",
    "wait_for_build",
]

RESULTS = ROOT / "bench" / "results"
TERMINAL = ("succeeded", "failed", "cancelled")
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


def submit_build(client: httpx.Client, ids: dict[str, str], **options: Any) -> str:
    """POST /v1/builds; the build id (a new or an identical one)."""
    response = client.post("/v1/builds", json={**ids, **options})
    if response.status_code not in (200, 202):
        raise RuntimeError(f"submit: {response.status_code} {response.text}")
    return str(response.json()["id"])


def wait_for_build(client: httpx.Client, build_id: str, timeout_s: float) -> dict[str, Any]:
    """Poll until the build ends; its last status (raises past ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        build: dict[str, Any] = client.get(f"/v1/builds/{build_id}").json()
        if build["status"] in TERMINAL:
            return build
        if time.monotonic() > deadline:
            raise TimeoutError(f"build {build_id} still {build['status']} after {timeout_s} s")
        time.sleep(0.3)


def prepare_builds(client: httpx.Client, load_s: float) -> tuple[dict[str, str], str, str]:
    """(upload ids, a finished build with a report, a build running for about ``load_s``)."""
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())})
    model.raise_for_status()
    dataset = client.post(
        "/v1/datasets",
        files={"file": ("d.npz", dataset_bytes())},
        data={"model_id": model.json()["id"]},
    )
    dataset.raise_for_status()
    ids = {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}
    done = submit_build(client, ids, spec={"precision": "fp32"})
    finished = wait_for_build(client, done, 120)
    if finished["status"] != "succeeded":
        raise RuntimeError(f"the first build did not succeed: {finished}")
    running = submit_build(
        client, ids, spec={"precision": "fp16"}, benchmark={"duration_s": min(load_s, 600)}
    )
    deadline = time.monotonic() + 60
    while client.get(f"/v1/builds/{running}").json()["status"] == "queued":
        if time.monotonic() > deadline:
            raise RuntimeError("the running build was never claimed")
        time.sleep(0.2)
    return ids, done, running


@dataclass
class LoadResult:
    """What the pollers saw."""

    clients: int
    duration_s: float
    interval_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values())

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        ok = len(self.latencies_s)
        return {
            "clients": self.clients,
            "duration_s": self.duration_s,
            "interval_s": self.interval_s,
            "requests": self.requests,
            "answered": ok,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "statuses": dict(self.statuses),
            "requests_per_s": round(ok / self.duration_s, 1),
            "p50_s": round(self.percentile(0.50), 4),
            "p95_s": round(self.percentile(0.95), 4),
            "p99_s": round(self.percentile(0.99), 4),
            "max_s": round(max(self.latencies_s, default=float("nan")), 4),
        }


async def poll_load(
    base_url: str,
    status_build: str,
    report_build: str,
    *,
    clients: int,
    duration_s: float,
    interval_s: float,
    timeout_s: float = 30.0,
    etags: bool = True,
) -> LoadResult:
    """``clients`` pollers of a build's status and another's report for ``duration_s``."""
    result = LoadResult(clients, duration_s, interval_s)
    paths = (f"/v1/builds/{status_build}", f"/v1/builds/{report_build}/report")
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    deadline = time.monotonic() + duration_s

    async def poller(client: httpx.AsyncClient, rng: random.Random) -> None:
        tags: dict[str, str] = {}
        await asyncio.sleep(rng.uniform(0, interval_s))  # spread the first round
        while time.monotonic() < deadline:
            for path in paths:
                headers = {"If-None-Match": tags[path]} if etags and path in tags else {}
                start = time.perf_counter()
                try:
                    response = await client.get(path, headers=headers)
                except httpx.TimeoutException:
                    result.errors["timeout"] += 1
                    continue
                except httpx.TransportError as exc:
                    result.errors[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - start
                if response.status_code not in (200, 304):
                    result.errors[f"http {response.status_code}"] += 1
                    continue
                result.latencies_s.append(elapsed)
                result.statuses[str(response.status_code)] += 1
                if tag := response.headers.get("etag"):
                    tags[path] = tag
            await asyncio.sleep(interval_s)

    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=httpx.Timeout(timeout_s)
    ) as client:
        await asyncio.gather(*(poller(client, random.Random(i)) for i in range(clients)))
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    env = {"TRTFORGE_WORKERS": str(args.workers)}
    env |= dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="trtforge-load-") as tmp:
        folder = Path(tmp)
        with running_server(args.root.resolve(), folder, env) as server:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                ids, done, running = prepare_builds(client, args.duration_s)
            started = time.monotonic()
            load = asyncio.run(
                poll_load(
                    server.url,
                    running,
                    done,
                    clients=args.clients,
                    duration_s=args.duration_s,
                    interval_s=args.interval_s,
                    timeout_s=args.timeout_s,
                    etags=not args.no_etags,
                )
            )
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
        "label": args.label,
        "root": str(args.root),
        "commit": _commit(args.root),
        "server_env": env,
        "load": load.summary(),
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
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--after-timeout-s", type=float, default=180.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-etags", action="store_true")
    parser.add_argument("--env", nargs="*", default=[], help="TRTFORGE_X=V for the server")
    parser.add_argument("--label", default="after")
    parser.add_argument("--output", default=None, help="merge into bench/results/<output>.json")
    args = parser.parse_args(argv)
    row = measure(args)
    print(json.dumps(row, indent=2))
    if args.output:
        path = RESULTS / f"{args.output}.json"
        merged: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        merged[args.label] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

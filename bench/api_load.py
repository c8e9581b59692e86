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
Each row also has the CPU seconds the server process (all its threads) and this load generator
used during the load: on a shared machine the server's CPU per answer is steadier than its
latencies, which depend on the CPU the scheduler gives it.

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
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.integration.conftest import Server  # noqa: E402
from tests.reliability.loadgen import (  # noqa: E402
    EventsResult,
    LoadResult,
    listen_events,
    poll_load,
    prepare_builds,
    submit_build,
    wait_for_build,
)

__all__ = ["git_commit", "measure", "running_server"]

RESULTS = ROOT / "bench" / "results"


@contextlib.contextmanager
def running_server(root: Path, folder: Path, env: dict[str, str]) -> Iterator[Server]:
    """``trtforge serve`` from the checkout at ``root`` (SQLite in its data directory)."""
    server = Server(folder / "data", None, folder / "server.log", env=env, root=root)
    server.start(ready_path="/healthz")
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
        raw=args.raw_clients,
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
            assert server.process is not None
            process = psutil.Process(server.process.pid)
            server_cpu = sum(process.cpu_times()[:2])
            generator_cpu = time.process_time()
            load_before = os.getloadavg()
            started = time.monotonic()
            load, events = asyncio.run(_load(server.url, running, done, args, interval_s))
            wall = time.monotonic() - started
            server_cpu = sum(process.cpu_times()[:2]) - server_cpu
            generator_cpu = time.process_time() - generator_cpu
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
        "commit": git_commit(args.root),
        "server_env": env,
        "generator": "raw HTTP/1.1 connections" if args.raw_clients else "httpx clients",
        "load": load.summary(),
        "event_streams": {
            "streams": events.streams,
            "events": dict(events.events),
            "ended": events.ended,
            "errors": dict(events.errors),
        },
        "load_wall_s": round(wall, 2),
        "cpu": {
            "server_s": round(server_cpu, 2),
            "server_ms_per_answer": round(1000 * server_cpu / max(1, len(load.latencies_s)), 3),
            "generator_s": round(generator_cpu, 2),
        },
        "build_after_load": {"status": after_status, "seconds": round(after_s, 2)},
        "machine": {
            "logical_cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "load_average_before": [round(x, 2) for x in load_before],
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_commit(root: Path) -> str:
    """The short commit id of the checkout at ``root`` (empty when git cannot tell)."""
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
    parser.add_argument(
        "--raw-clients",
        action="store_true",
        help="pollers write HTTP/1.1 by hand instead of using httpx (a cheaper generator)",
    )
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

"""The server's CPU per request, per kind of request, for one or more checkouts side by side.

Issue 11, defect 3: under many pollers the server is CPU-bound in one process (its event loop and
the threads it hands database work to share the GIL), so what a poll costs in CPU sets how many
pollers a core serves. On a shared machine latencies say more about the neighbours than about
the server; the CPU seconds the server process spends per request do not (much).

For each ``--server LABEL=DIR`` it starts ``trtforge serve`` from that checkout (SQLite, one
in-process build slot), builds the tiny test CNN once (so a finished build and its report exist),
then, in rounds that alternate between the servers, sends ``--connections`` keep-alive
connections x ``--requests`` requests of each kind and reads the server process's CPU time
(user + system, all threads) before and after. The client is a plain socket writer (HTTP/1.1,
keep-alive): it costs little, so the measured process is the only busy one.

Kinds: ``status 200`` (``GET /v1/builds/{id}``), ``status 304`` (the same with its ETag in
``If-None-Match``), ``report 304`` and ``report 200`` (``GET /v1/builds/{id}/report``), and
``healthz`` (the framework's floor: no dependencies, no database).

    python bench/api_cost.py --server before=/tmp/trtforge-before --server after=.
        [--rounds 3] [--connections 16] [--requests 100] [--output api_cost]

Prints one JSON line per measurement and the medians; with ``--output`` writes them to
bench/results/<output>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.api_load import git_commit  # noqa: E402
from tests.integration.conftest import Server  # noqa: E402
from tests.reliability.loadgen import submit_build, upload_inputs, wait_for_build  # noqa: E402

__all__ = ["measure_kind"]

RESULTS = ROOT / "bench" / "results"
_SERVER_ENV = {
    "TRTFORGE_WORKERS": "1",
    "TRTFORGE_POLL_INTERVAL_S": "1",
    "TRTFORGE_HEARTBEAT_S": "5",
    "TRTFORGE_STALE_AFTER_S": "60",
}
"""One slot that wakes rarely: the idle worker's CPU stays out of the requests' numbers."""


async def _connection(port: int, request: bytes, count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status not in (200, 304):
                raise RuntimeError(f"answered {head!r}")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


def measure_kind(
    server: Server, path: str, headers: dict[str, str], connections: int, requests: int
) -> dict[str, Any]:
    """``connections`` x ``requests`` GETs of ``path``: the server's CPU ms per request."""
    assert server.process is not None
    process = psutil.Process(server.process.pid)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    latencies: list[float] = []

    async def run() -> None:
        await asyncio.gather(
            *(_connection(server.port, request, requests, latencies) for _ in range(connections))
        )

    cpu = sum(process.cpu_times()[:2])
    started = time.monotonic()
    asyncio.run(run())
    wall = time.monotonic() - started
    cpu = sum(process.cpu_times()[:2]) - cpu
    latencies.sort()
    return {
        "requests": len(latencies),
        "server_cpu_ms_per_request": round(1000 * cpu / len(latencies), 3),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _kinds(server: Server) -> dict[str, tuple[str, dict[str, str]]]:
    """Upload, build once; the request of each kind."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        ids = upload_inputs(client)
        build = submit_build(client, ids, spec={"precision": "fp32"})
        if wait_for_build(client, build, 180)["status"] != "succeeded":
            raise RuntimeError("the build did not succeed")
        status_tag = client.get(f"/v1/builds/{build}").headers["etag"]
        report_tag = client.get(f"/v1/builds/{build}/report").headers["etag"]
    return {
        "status 200": (f"/v1/builds/{build}", {}),
        "status 304": (f"/v1/builds/{build}", {"If-None-Match": status_tag}),
        "report 304": (f"/v1/builds/{build}/report", {"If-None-Match": report_tag}),
        "report 200": (f"/v1/builds/{build}/report", {}),
        "healthz": ("/healthz", {}),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--server", action="append", required=True, help="LABEL=checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--requests", type=int, default=100, help="per connection and kind")
    parser.add_argument("--output", default=None, help="write bench/results/<output>.json")
    args = parser.parse_args(argv)
    specs = [item.split("=", 1) for item in args.server]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trtforge-cost-") as tmp:
        servers: list[tuple[str, Path, Server, dict[str, tuple[str, dict[str, str]]]]] = []
        try:
            for index, (label, root) in enumerate(specs):
                folder = Path(tmp) / str(index)
                server = Server(
                    folder / "data",
                    None,
                    Path(tmp) / f"server-{index}.log",
                    env=_SERVER_ENV,
                    root=Path(root).resolve(),
                )
                server.start(ready_path="/healthz")
                servers.append((label, Path(root).resolve(), server, _kinds(server)))
            for round_ in range(args.rounds):  # alternate, so drifts in machine load hit all
                for label, root, server, kinds in servers:
                    for kind, (path, headers) in kinds.items():
                        row = {"round": round_, "label": label, "commit": git_commit(root)}
                        row |= {"kind": kind}
                        row |= measure_kind(server, path, headers, args.connections, args.requests)
                        print(json.dumps(row), file=sys.stderr, flush=True)
                        rows.append(row)
        finally:
            for _, _, server, _ in servers:
                server.stop()
    medians: dict[str, dict[str, float]] = {}
    for row in rows:
        medians.setdefault(row["label"], {}).setdefault(row["kind"], 0.0)
    for label, kinds in medians.items():
        for kind in kinds:
            values = [
                r["server_cpu_ms_per_request"]
                for r in rows
                if r["label"] == label and r["kind"] == kind
            ]
            kinds[kind] = round(statistics.median(values), 3)
    summary = {
        "what": "server CPU ms per request (median over rounds)",
        "connections": args.connections,
        "requests_per_connection": args.requests,
        "logical_cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "medians": medians,
        "rows": rows,
    }
    print(json.dumps(medians, indent=2))
    if args.output:
        path = RESULTS / f"{args.output}.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

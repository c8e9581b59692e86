"""A load generator for a real trtforge server: status/report pollers and event-stream listeners.

Used by ``tests/reliability/test_load.py`` and ``bench/api_load.py``. Every poller is its own
``httpx.AsyncClient`` with one connection, as independent clients are (one shared client's pool
would also cost the generator time that grows with the number of connections). A poller repeats
``GET /v1/builds/{status_build}`` then ``GET /v1/builds/{report_build}/report``, sending back the
last ``ETag`` as ``If-None-Match``, and sleeps ``interval_s`` between rounds; its first round
starts at a random point of the first interval. Any answer other than 200/304, any transport
error and any timeout is an error. ``poll_load(raw=True)`` (bench/api_load.py --raw-clients) does
the same with hand-written HTTP/1.1 connections, which cost the generator far less CPU than
``httpx``: on a small machine the generator shares the cores with the server it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.unit.service.support import dataset_bytes, model_bytes

__all__ = [
    "TERMINAL",
    "EventsResult",
    "LoadResult",
    "listen_events",
    "poll_load",
    "prepare_builds",
    "submit_build",
    "upload_inputs",
    "wait_for_build",
]

TERMINAL = ("succeeded", "failed", "cancelled")


def submit_build(client: httpx.Client, ids: dict[str, str], **options: Any) -> str:
    """POST /v1/builds; the build's id (a new or an identical one)."""
    response = client.post("/v1/builds", json={**ids, **options})
    if response.status_code not in (200, 202):
        raise RuntimeError(f"submit: {response.status_code} {response.text}")
    return str(response.json()["id"])


def wait_for_build(client: httpx.Client, build_id: str, timeout_s: float) -> dict[str, Any]:
    """Poll until the build ends; its last status (:class:`TimeoutError` past ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        build: dict[str, Any] = client.get(f"/v1/builds/{build_id}").json()
        if build["status"] in TERMINAL:
            return build
        if time.monotonic() > deadline:
            raise TimeoutError(f"build {build_id} still {build['status']} after {timeout_s} s")
        time.sleep(0.3)


def upload_inputs(client: httpx.Client) -> dict[str, str]:
    """Upload the tiny CNN and a dataset for it; their ``model_id`` and ``dataset_id``."""
    model = client.post("/v1/models", files={"file": ("tiny.onnx", model_bytes())})
    model.raise_for_status()
    dataset = client.post(
        "/v1/datasets",
        files={"file": ("d.npz", dataset_bytes())},
        data={"model_id": model.json()["id"]},
    )
    dataset.raise_for_status()
    return {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}


def prepare_builds(client: httpx.Client, running_s: float) -> tuple[dict[str, str], str, str]:
    """Upload the tiny CNN and a dataset; build it once (FP32, so a report exists), then submit
    an FP16 build whose benchmark lasts ``running_s`` and wait until a worker runs it.

    Returns (the upload ids, the finished build, the running build)."""
    ids = upload_inputs(client)
    done = submit_build(client, ids, spec={"precision": "fp32"})
    finished = wait_for_build(client, done, 120)
    if finished["status"] != "succeeded":
        raise RuntimeError(f"the first build did not succeed: {finished}")
    running = submit_build(
        client,
        ids,
        spec={"precision": "fp16"},
        benchmark={"duration_s": min(running_s, 600), "warmup_ms": 0},
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
    started_s: list[float] = field(default_factory=list)
    """When each answered request was sent, in seconds since the load began."""
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile(self, q: float) -> float:
        """The ``q`` quantile of the answered requests' latencies (nearest rank)."""
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        answered = len(self.latencies_s)
        return {
            "clients": self.clients,
            "duration_s": self.duration_s,
            "interval_s": self.interval_s,
            "requests": answered + self.error_count,
            "answered": answered,
            "errors": self.error_count,
            "error_kinds": dict(self.errors),
            "statuses": dict(self.statuses),
            "answers_per_s": round(answered / self.duration_s, 1),
            "p50_s": round(self.percentile(0.50), 4),
            "p95_s": round(self.percentile(0.95), 4),
            "p99_s": round(self.percentile(0.99), 4),
            "max_s": round(max(self.latencies_s, default=float("nan")), 4),
        }


def _client(base_url: str, timeout_s: float, tls: ssl.SSLContext) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=1),
        verify=tls,  # shared: building a context per client costs ~10 ms each
    )


class _RawConnection:
    """One keep-alive HTTP/1.1 connection written and read by hand: GETs whose answers carry a
    ``Content-Length`` (all the polled ones do). It costs a small fraction of an ``httpx`` client's
    CPU, so a load generator on the server's machine takes less of the CPU it measures."""

    def __init__(self, base_url: str) -> None:
        url = httpx.URL(base_url)
        self.host, self.port = url.host, url.port or 80
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, str | None]:
        """(status, ETag) of ``GET path``; reconnects once when the server had closed a kept
        connection between requests (keep-alive ended), never after a fresh one failed."""
        for attempt in (0, 1):
            reused = self.streams is not None
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            lines = [f"GET {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.close()
                if attempt == 0 and reused:
                    continue
                raise
            status, fields = _parse_head(head)
            await reader.readexactly(int(fields.get("content-length", "0")))
            if fields.get("connection", "").lower() == "close":
                await self.close()
            return status, fields.get("etag")
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            fields[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), fields


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
    raw: bool = False,
) -> LoadResult:
    """``clients`` pollers of one build's status and another's report for ``duration_s``
    (``raw``: each poller a :class:`_RawConnection` instead of an ``httpx`` client)."""
    if raw:
        return await _poll_raw(
            base_url,
            (f"/v1/builds/{status_build}", f"/v1/builds/{report_build}/report"),
            LoadResult(clients, duration_s, interval_s),
            timeout_s=timeout_s,
            etags=etags,
        )
    result = LoadResult(clients, duration_s, interval_s)
    paths = (f"/v1/builds/{status_build}", f"/v1/builds/{report_build}/report")

    async def poller(client: httpx.AsyncClient, rng: random.Random, deadline: float) -> None:
        tags: dict[str, str] = {}
        await asyncio.sleep(rng.uniform(0, interval_s))
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
                result.started_s.append(start - began)
                result.statuses[str(response.status_code)] += 1
                if tag := response.headers.get("etag"):
                    tags[path] = tag
            await asyncio.sleep(interval_s)

    tls = ssl.create_default_context()
    async with contextlib.AsyncExitStack() as stack:
        pool = [
            await stack.enter_async_context(_client(base_url, timeout_s, tls))
            for _ in range(clients)
        ]
        began = time.perf_counter()
        deadline = time.monotonic() + duration_s
        await asyncio.gather(
            *(poller(client, random.Random(i), deadline) for i, client in enumerate(pool))
        )
    return result


async def _poll_raw(
    base_url: str, paths: tuple[str, str], result: LoadResult, *, timeout_s: float, etags: bool
) -> LoadResult:
    """:func:`poll_load` with hand-written HTTP/1.1 connections (same rounds, same counting)."""
    interval_s = result.interval_s

    async def poller(rng: random.Random, deadline: float) -> None:
        connection = _RawConnection(base_url)
        tags: dict[str, str] = {}
        await asyncio.sleep(rng.uniform(0, interval_s))
        try:
            while time.monotonic() < deadline:
                for path in paths:
                    headers = {"If-None-Match": tags[path]} if etags and path in tags else {}
                    start = time.perf_counter()
                    try:
                        status, tag = await asyncio.wait_for(
                            connection.get(path, headers), timeout_s
                        )
                    except TimeoutError:
                        result.errors["timeout"] += 1
                        await connection.close()
                        continue
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        result.errors[type(exc).__name__] += 1
                        await connection.close()
                        continue
                    elapsed = time.perf_counter() - start
                    if status not in (200, 304):
                        result.errors[f"http {status}"] += 1
                        continue
                    result.latencies_s.append(elapsed)
                    result.started_s.append(start - began)
                    result.statuses[str(status)] += 1
                    if tag:
                        tags[path] = tag
                await asyncio.sleep(interval_s)
        finally:
            await connection.close()

    began = time.perf_counter()
    deadline = time.monotonic() + result.duration_s
    await asyncio.gather(*(poller(random.Random(i), deadline) for i in range(result.clients)))
    return result


@dataclass
class EventsResult:
    """What the event-stream listeners saw."""

    streams: int
    events: Counter[str] = field(default_factory=Counter)
    ended: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def listen_events(
    base_url: str, build_id: str, *, streams: int, duration_s: float
) -> EventsResult:
    """``streams`` listeners of ``GET /v1/builds/{id}/events`` for up to ``duration_s`` (or
    until the stream ends with the build)."""
    result = EventsResult(streams)
    tls = ssl.create_default_context()

    async def listen(client: httpx.AsyncClient) -> None:
        try:
            async with client.stream("GET", f"/v1/builds/{build_id}/events") as response:
                if response.status_code != 200:
                    result.errors[f"http {response.status_code}"] += 1
                    return
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                        result.events[kind] += 1
                        if kind == "end":
                            result.ended += 1
        except httpx.TransportError as exc:
            result.errors[type(exc).__name__] += 1

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(_client(base_url, duration_s + 30, tls))
            for _ in range(streams)
        ]
        tasks = [asyncio.create_task(listen(client)) for client in clients]
        if not tasks:
            return result
        _, pending = await asyncio.wait(tasks, timeout=duration_s)
        for task in pending:  # still streaming: the build outlived the load
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return result

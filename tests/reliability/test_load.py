"""Load (issue 11, defect 3): 500 concurrent pollers of a build's status and another's report,
plus event-stream listeners, against a real uvicorn server while a build runs. Zero errors, p99
under 2 s, and a build submitted afterwards finishes (the queue is alive).

Before the fix the same load deadlocked the server: every request held its database session
until its response was sent, and serializing the response needed one of the 40 threads that
were all waiting for one of the pool's 15 connections (500 clients: 2 answers, 998 timeouts; see
bench/README.md). The listeners outnumber the pool's 40 connections and the API's 40 threads, so
a stream that held either between its polls would starve the pollers.

The pollers pace themselves (``INTERVAL_S`` between rounds): the load generator, the server and
the build's CPU benchmark share this machine's cores, so the offered rate is what the machine
can serve; bench/api_load.py measures the curve up to one round a second. The pollers write
HTTP/1.1 by hand (``poll_load(raw=True)``): 500 ``httpx`` clients spent as much CPU as the server
on the same cores and their own event-loop delay became most of the latency measured (p99 1-4 s
with ``httpx``, 0.35-0.6 s by hand, the same server on 2 busy cores: bench/README.md).
``TRTFORGE_TEST_LOAD_INTERVAL_S`` and ``TRTFORGE_TEST_LOAD_P99_S`` set the pace and the bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import Server, running_server
from tests.reliability.loadgen import (
    EventsResult,
    LoadResult,
    listen_events,
    poll_load,
    prepare_builds,
    submit_build,
    wait_for_build,
)
from tests.unit.service.support import DATABASES

pytestmark = pytest.mark.reliability

CLIENTS = 500
STREAMS = 45  # > the 40 database connections and the 40 API threads (the defaults)
LOAD_S = 20.0
INTERVAL_S = float(os.environ.get("TRTFORGE_TEST_LOAD_INTERVAL_S", "5"))
_SMALL_MACHINE = (os.cpu_count() or 1) < 4
P99_LIMIT_S = float(os.environ.get("TRTFORGE_TEST_LOAD_P99_S", "5" if _SMALL_MACHINE else "2"))
"""The issue's 2 s where the machine has room. On fewer than 4 cores the pollers, the server, the
database and the running build share 2 cores with whatever else runs there: measured p99 0.41 s
(SQLite) and 0.28 s (PostgreSQL) on 2 cores at load 4, 0.35-0.6 s in bench/api_load.py runs;
5 s leaves room for a busier machine (CI)."""
ROUNDS = 2
"""Rounds every poller completes at least (each round: a status and a report poll; ~4 fit)."""


@pytest.fixture(scope="module", params=DATABASES)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("load")
    env = {"TRTFORGE_WORKERS": "2", "TRTFORGE_POLL_INTERVAL_S": "1"}
    with running_server(request.param, folder, **env) as srv:
        yield srv


@pytest.fixture(scope="module")
def builds(server: Server) -> tuple[dict[str, str], str, str]:
    """(upload ids, a finished build with a report, a build running for the whole load)."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        return prepare_builds(client, LOAD_S + 15)


async def _load(server: Server, done: str, running: str) -> tuple[LoadResult, EventsResult]:
    polls = poll_load(
        server.url,
        running,
        done,
        clients=CLIENTS,
        duration_s=LOAD_S,
        interval_s=INTERVAL_S,
        raw=True,  # a cheap generator: it shares the machine's cores with the server it measures
    )
    streams = listen_events(server.url, running, streams=STREAMS, duration_s=LOAD_S)
    return await asyncio.gather(polls, streams)


def test_500_pollers_get_answers_fast_and_the_queue_stays_alive(
    server: Server, builds: tuple[dict[str, str], str, str]
) -> None:
    ids, done, running = builds
    load, events = asyncio.run(_load(server, done, running))
    summary = load.summary()

    assert load.error_count == 0, (summary, server.log())
    assert load.percentile(0.99) < P99_LIMIT_S, summary
    # every poller made its rounds, and the ETags turned report polls into 304s
    assert len(load.latencies_s) >= ROUNDS * 2 * CLIENTS, summary
    assert load.statuses["304"] >= CLIENTS, summary
    assert not events.errors, events
    assert events.events["status"] >= STREAMS, events  # every listener was answered

    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get(f"/v1/builds/{running}").json()["status"] not in ("queued", "failed")
        after = submit_build(client, ids, spec={"precision": "int8"})
        assert wait_for_build(client, after, 120)["status"] == "succeeded"
    assert "Traceback" not in server.log()


def test_report_and_status_etags_on_a_real_build(
    server: Server, builds: tuple[dict[str, str], str, str]
) -> None:
    _, done, _ = builds
    with httpx.Client(base_url=f"{server.url}/v1/builds/{done}", timeout=30) as client:
        self_url = f"{server.url}/v1/builds/{done}"  # no trailing slash
        report = client.get("/report")
        assert report.status_code == 200
        sha = hashlib.sha256(report.content).hexdigest()  # the blob's name is its sha256
        assert report.headers["etag"] == f'"{sha}"'
        again = client.get("/report", headers={"If-None-Match": report.headers["etag"]})
        assert (again.status_code, again.content) == (304, b"")

        html = client.get("/report", params={"format": "html"})
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assert html.headers["etag"] == f'W/"{sha}-html"'
        for tag in (html.headers["etag"], "*"):
            cached = client.get("/report", params={"format": "html"}, headers={"If-None-Match": tag})
            assert (cached.status_code, cached.content) == (304, b"")
        # the JSON tag names the JSON bytes, not the page
        other = client.get(
            "/report", params={"format": "html"}, headers={"If-None-Match": report.headers["etag"]}
        )
        assert other.status_code == 200

        status = client.get(self_url)
        assert status.json()["status"] == "succeeded"
        unchanged = client.get(self_url, headers={"If-None-Match": status.headers["etag"]})
        assert (unchanged.status_code, unchanged.headers["etag"]) == (304, status.headers["etag"])
        star = client.get(self_url, headers={"If-None-Match": "*"})
        assert star.status_code == 304

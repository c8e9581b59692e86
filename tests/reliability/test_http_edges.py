"""The HTTP edge against real ``trtforge serve`` processes: bodies refused before they are read
(the server's memory measured), slow-header connections closed, Host checked, cross-site state
changes refused, CORS off by default and on by setting, integers bounded. Every refusal answers
the error envelope, leaves no file behind, and the server answers ``/healthz`` after it."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from service.api.auth import create_token
from service.db import Database
from service.schemas import Scope
from tests.integration.conftest import Server
from tests.unit.service.support import DATABASES, database_url, login_form

pytestmark = pytest.mark.reliability

HEADER_TIMEOUT_S = 2.0
UPLOAD_LIMIT = 2 << 20
MiB = 1 << 20


@contextlib.contextmanager
def _server(kind: str, folder: Path, **env: str) -> Iterator[Server]:
    with database_url(kind, folder) as url:
        server = Server(
            folder / "data",
            url,
            folder / "server.log",
            env={
                "TRTFORGE_WORKERS": "0",  # no builds here: the edge is under test
                "TRTFORGE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
                "TRTFORGE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
                **env,
            },
        )
        server.start(ready_path="/healthz")
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module", params=DATABASES)
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    """A server that requires tokens (CORS off, the defaults otherwise) and a build token."""
    with _server(request.param, tmp_path_factory.mktemp("edge"), TRTFORGE_AUTH="true") as srv:
        db = Database(srv.database_url)
        try:
            with db.session() as session:
                _row, token = create_token(session, "edge", Scope.BUILD)
        finally:
            db.dispose()
        yield srv, token


@pytest.fixture(scope="module")
def open_cors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A loopback server without authentication whose CORS allows one origin."""
    folder = tmp_path_factory.mktemp("cors")
    with _server("sqlite", folder, TRTFORGE_CORS_ORIGINS="https://app.example") as srv:
        yield srv


def _error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["hint"]
    return dict(error)


def _healthy(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def _leftovers(server: Server) -> list[str]:
    return sorted(
        p.relative_to(server.data_dir).as_posix()
        for folder in ("tmp", "blobs", "models", "datasets", "work")
        for p in (server.data_dir / folder).rglob("*")
        if p.is_file()
    )


class _PeakRss:
    """The server's resident memory, sampled every 10 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return float(self.peak - self.before) / MiB


def _chunks(total_bytes: int, chunk: bytes) -> Iterator[bytes]:
    """A body streamed from a generator: the client never holds it."""
    sent = 0
    while sent < total_bytes:
        piece = chunk[: total_bytes - sent]
        sent += len(piece)
        yield piece


def _pid(server: Server) -> int:
    assert server.process is not None
    return server.process.pid


# -- bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_a_400_mb_body_without_a_token_is_refused_unread(
    secured: tuple[Server, str], declared: bool
) -> None:
    server, _token = secured
    size = 400 * MiB
    headers = {"content-type": "application/json"}
    if declared:
        headers["content-length"] = str(size)
    started = time.monotonic()
    with _PeakRss(_pid(server)) as rss:
        response = httpx.post(
            f"{server.url}/v1/builds",
            content=_chunks(size, b"[" * MiB),
            headers=headers,
            timeout=60,
        )
    elapsed = time.monotonic() - started
    _error(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"
    assert elapsed < 10, elapsed
    assert rss.growth_mb < 50, rss.growth_mb
    assert _leftovers(server) == []
    _healthy(server)


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_a_json_body_over_the_cap_is_413(secured: tuple[Server, str], declared: bool) -> None:
    server, token = secured
    size = 64 * MiB
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
    if declared:
        headers["content-length"] = str(size)
    with _PeakRss(_pid(server)) as rss:
        response = httpx.post(
            f"{server.url}/v1/builds", content=_chunks(size, b" " * MiB), headers=headers, timeout=60
        )
    error = _error(response, 413, "payload_too_large")
    assert error["field"] == "body"
    assert rss.growth_mb < 50, rss.growth_mb
    _healthy(server)


def test_a_small_json_body_still_reaches_validation(secured: tuple[Server, str]) -> None:
    server, token = secured
    response = httpx.post(
        f"{server.url}/v1/builds",
        json={"model_id": "m", "dataset_id": "d", "accuracy": {"seed": -1}},
        headers={"authorization": f"Bearer {token}"},
    )
    assert _error(response, 422, "request_invalid")["field"] == "accuracy.seed"


def _multipart_fields(count: int, field_bytes: int, boundary: str) -> Iterator[bytes]:
    value = b"v" * field_bytes
    for index in range(count):
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="f{index}"\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\nxx\r\n--{boundary}--\r\n"
    ).encode()


def test_thousands_of_multipart_text_fields_are_413(secured: tuple[Server, str]) -> None:
    server, token = secured
    boundary = "edgeboundary"
    with _PeakRss(_pid(server)) as rss:
        response = httpx.post(
            f"{server.url}/v1/models",
            content=_multipart_fields(5000, 60 * 1024, boundary),
            headers={
                "authorization": f"Bearer {token}",
                "content-type": f"multipart/form-data; boundary={boundary}",
            },
            timeout=60,
        )
    _error(response, 413, "payload_too_large")
    assert rss.growth_mb < 50, rss.growth_mb
    assert _leftovers(server) == []
    _healthy(server)


def test_an_undeclared_upload_over_the_limit_is_413_and_leaves_nothing(
    secured: tuple[Server, str],
) -> None:
    server, token = secured
    boundary = "edgeboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from _chunks(UPLOAD_LIMIT * 3, b"\0" * (256 * 1024))
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{server.url}/v1/models",
        content=body(),
        headers={
            "authorization": f"Bearer {token}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
        timeout=60,
    )
    _error(response, 413, "payload_too_large")
    assert _leftovers(server) == []
    _healthy(server)


# -- connections -------------------------------------------------------------------------------


def _closed_after(sock: socket.socket, trickle: bytes | None, limit_s: float) -> float | None:
    """Seconds until the server closed ``sock`` (sending ``trickle`` every 0.5 s), or None."""
    started = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - started < limit_s:
        try:
            if trickle is not None:
                sock.sendall(trickle)
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_slow_header_connections_are_closed_within_the_header_timeout(
    secured: tuple[Server, str],
) -> None:
    server, _token = secured
    host, port = "127.0.0.1", server.port
    silent = [socket.create_connection((host, port)) for _ in range(20)]
    trickling = [socket.create_connection((host, port)) for _ in range(20)]
    for sock in trickling:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode())
    try:
        _healthy(server)  # served while 40 connections dawdle
        closes = [_closed_after(s, None, HEADER_TIMEOUT_S + 3) for s in silent[:1]]
        closes += [_closed_after(s, b"X-Slow: 1\r\n", HEADER_TIMEOUT_S + 3) for s in trickling[:1]]
        assert all(c is not None and c < HEADER_TIMEOUT_S + 1.5 for c in closes), closes
        time.sleep(0.5)
        for sock in silent[1:] + trickling[1:]:  # the others were closed meanwhile
            assert _closed_after(sock, None, 1.0) is not None
    finally:
        for sock in silent + trickling:
            sock.close()
    _healthy(server)


def _answers(sock: socket.socket, count: int) -> list[bytes]:
    """The status lines of the next ``count`` answers on ``sock`` (bodies have a length)."""
    reader = sock.makefile("rb")
    statuses = []
    for _ in range(count):
        statuses.append(reader.readline().strip())
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        reader.read(length)
    return statuses


def test_request_heads_are_bounded_in_size(secured: tuple[Server, str]) -> None:
    """The parser (httptools) has no limit of its own: the protocol answers 400 past 16 KiB of
    request line and headers (h11's limit before) and closes the connection (unbounded, the 16
    MiB header would be read and buffered whole: more than the kernel's socket buffers take)."""
    server, _token = secured
    head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"{head}X-Big: {'a' * 15_000}\r\n\r\n".encode())
        assert _answers(sock, 1) == [b"HTTP/1.1 200 OK"]  # under the limit
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sent = 0
        with contextlib.suppress(OSError):  # the server closes while we send
            sock.sendall(f"{head}X-Big: ".encode())
            while sent < 16 * MiB:
                sock.sendall(b"a" * 65536)
                sent += 65536
                time.sleep(0.001)
            sock.sendall(b"\r\n\r\n")
        assert sent < 16 * MiB, "the server read a 16 MiB header"
        with contextlib.suppress(OSError):  # a reset may drop the answer: closed is the point
            assert sock.recv(1 << 16).startswith(b"HTTP/1.1 400")
    _healthy(server)


def test_pipelined_requests_are_all_answered(secured: tuple[Server, str]) -> None:
    server, _token = secured
    head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() * 3)
        assert _answers(sock, 3) == [b"HTTP/1.1 200 OK"] * 3
        sock.sendall(head.encode())  # and the connection is still open for more
        assert _answers(sock, 1) == [b"HTTP/1.1 200 OK"]


def test_keep_alive_connections_still_serve_requests(secured: tuple[Server, str]) -> None:
    server, _token = secured
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(0.3)


# -- browsers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.2", ""])
def test_a_foreign_host_header_is_421(secured: tuple[Server, str], host: str) -> None:
    server, token = secured
    response = httpx.get(
        f"{server.url}/v1/models", headers={"host": host, "authorization": f"Bearer {token}"}
    )
    _error(response, 421, "host_not_allowed")
    _healthy(server)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_loopback_names_are_answered(secured: tuple[Server, str], host: str) -> None:
    server, token = secured
    response = httpx.get(
        f"{server.url}/v1/models",
        headers={"host": f"{host}:{server.port}", "authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text


def _form_post(server: Server, headers: dict[str, str]) -> httpx.Response:
    """What a page's ``<form enctype=multipart/form-data>`` posting a model sends."""
    return httpx.post(
        f"{server.url}/v1/models", files={"file": ("m.onnx", b"not onnx")}, headers=headers
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"origin": "http://evil.example", "sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ],
    ids=["origin", "null-origin", "fetch-metadata", "same-site"],
)
def test_cross_site_state_changes_without_a_token_are_403(
    open_cors: Server, headers: dict[str, str]
) -> None:
    response = _form_post(open_cors, headers)
    _error(response, 403, "cross_origin_refused")
    assert _leftovers(open_cors) == []
    delete = httpx.delete(f"{open_cors.url}/v1/builds/x", headers=headers)
    _error(delete, 403, "cross_origin_refused")
    _healthy(open_cors)


@pytest.mark.parametrize(
    "headers",
    [
        {},  # not a browser
        {"sec-fetch-site": "same-origin", "origin": "http://127.0.0.1"},
        {"sec-fetch-site": "none"},
        {"origin": "https://app.example"},  # listed in TRTFORGE_CORS_ORIGINS
    ],
    ids=["no-browser", "same-origin", "typed-url", "allowed-origin"],
)
def test_same_origin_and_allowed_origins_may_post(
    open_cors: Server, headers: dict[str, str]
) -> None:
    if headers.get("origin") == "http://127.0.0.1":
        headers = {**headers, "origin": open_cors.url}
    response = _form_post(open_cors, headers)
    _error(response, 422, "model_invalid")  # reached the route: the bytes are no model


def test_cors_is_off_by_default(secured: tuple[Server, str]) -> None:
    server, token = secured
    preflight = httpx.options(
        f"{server.url}/v1/builds",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    _error(preflight, 403, "cross_origin_refused")
    assert "access-control-allow-origin" not in preflight.headers
    read = httpx.get(
        f"{server.url}/v1/models",
        headers={"origin": "https://app.example", "authorization": f"Bearer {token}"},
    )
    assert read.status_code == 200
    assert "access-control-allow-origin" not in read.headers


def test_cors_allows_the_listed_origins(open_cors: Server) -> None:
    preflight = httpx.options(
        f"{open_cors.url}/v1/builds",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    read = httpx.get(f"{open_cors.url}/v1/models", headers={"origin": "https://app.example"})
    assert read.status_code == 200
    assert read.headers["access-control-allow-origin"] == "https://app.example"
    assert "content-range" in read.headers["access-control-expose-headers"].lower()
    other = httpx.options(
        f"{open_cors.url}/v1/builds",
        headers={"origin": "https://other.example", "access-control-request-method": "POST"},
    )
    _error(other, 403, "cross_origin_refused")


# -- integers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/builds?offset=1e30", "offset"),
        (f"/v1/builds?offset={10**19}", "offset"),
        (f"/v1/models?offset={10**19}", "offset"),
        (f"/v1/datasets?offset={10**30}", "offset"),
        (f"/v1/calibration-tables?offset={10**19}", "offset"),
        (f"/v1/builds/b/logs?after={10**29}", "after"),
        ("/?page=1e30", "page"),
        (f"/?page={10**19}", "page"),
    ],
)
def test_huge_integers_in_queries_are_422(
    secured: tuple[Server, str], path: str, field: str
) -> None:
    server, token = secured
    response = httpx.get(f"{server.url}{path}", headers={"authorization": f"Bearer {token}"})
    assert _error(response, 422, "request_invalid")["field"] == field
    _healthy(server)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"accuracy": {"seed": -1}}, "accuracy.seed"),
        ({"accuracy": {"seed": 1 << 40}}, "accuracy.seed"),
        ({"benchmark": {"iterations": 10**12}}, "benchmark.iterations"),
        ({"benchmark": {"batch_size": 100_000}}, "benchmark.batch_size"),
        ({"calibration": {"max_samples": 10**30}}, "calibration.max_samples"),
        ({"model_id": "m" * 10_000}, "model_id"),
    ],
)
def test_out_of_range_build_options_are_422(
    secured: tuple[Server, str], body: dict[str, object], field: str
) -> None:
    server, token = secured
    payload = {"model_id": "m", "dataset_id": "d", **body}
    response = httpx.post(
        f"{server.url}/v1/builds",
        content=json.dumps(payload),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    assert _error(response, 422, "request_invalid")["field"] == field
    _healthy(server)


def test_the_session_cookie_is_secure_behind_a_tls_proxy(secured: tuple[Server, str]) -> None:
    server, token = secured
    with httpx.Client(base_url=server.url) as browser:
        plain = browser.post("/login", data=login_form(browser, token))
    with httpx.Client(base_url=server.url) as browser:
        proxied = browser.post(
            "/login", data=login_form(browser, token), headers={"x-forwarded-proto": "https"}
        )
    for response in (plain, proxied):
        assert response.status_code == 303
        assert token not in response.headers["set-cookie"]
        assert "samesite=strict" in response.headers["set-cookie"].lower()
    assert "secure" not in plain.headers["set-cookie"].lower()
    assert "secure" in proxied.headers["set-cookie"].lower()  # 127.0.0.1 is a trusted proxy

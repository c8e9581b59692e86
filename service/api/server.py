"""How ``trtforge serve`` runs uvicorn: the options, and an HTTP protocol with a header deadline.

The protocol is uvicorn's ``httptools`` one (llhttp, in C): under many pollers the server is
CPU-bound in its one event-loop thread, and parsing with the pure-Python ``h11`` costs about a
tenth of each request there (bench/README.md, "The API under load").

uvicorn does not bound the time a client takes to send its request headers: its keep-alive
timer only runs between requests and any byte received cancels it, so a client that opens a
connection and trickles a header byte now and then holds the connection (and its slot against
``limit_concurrency``) for as long as it likes. No uvicorn option bounds this, and an ASGI
middleware cannot either (the app is called once the headers are complete), so the bound lives
in the protocol: :class:`HeaderDeadlineProtocol` closes a connection whose request headers are
not complete ``header_timeout_s`` after it opened or after its previous response ended. Request
bodies are not covered (a slow upload is legitimate); the app bounds their size.

``httptools`` does not bound the size of request headers either (``h11`` stops at 16 KiB): the
protocol counts the bytes a connection sends while a request's headers are incomplete and
answers 400 past :data:`MAX_HEADER_BYTES` (as uvicorn's ``h11`` protocol does at its limit).

Nothing here imports the web framework, so the CLI may import it (see the import contracts).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

__all__ = [
    "MAX_HEADER_BYTES",
    "HeaderDeadlineProtocol",
    "protocol_with_deadline",
    "uvicorn_options",
]

MAX_HEADER_BYTES = 16 * 1024
"""The most bytes of a request line and headers (``h11``'s default limit, which the server had
before it parsed with ``httptools``); a larger head is answered 400 and the connection closed."""


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections that do not send their headers in time
    (or send more than :data:`MAX_HEADER_BYTES` of them)."""

    header_timeout_s = 10.0
    max_header_bytes = MAX_HEADER_BYTES
    _header_deadline: asyncio.TimerHandle | None = None
    _awaiting_headers = True
    """Whether the bytes that arrive now are a request's line and headers: from the connection's
    start, or the end of the previous request's body, until its headers are complete."""
    _header_bytes = 0
    _heads = 0
    """Requests whose headers were complete (so a chunk that finished one is not counted)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        heads, awaiting = self._heads, self._awaiting_headers
        super().data_received(data)
        if not (awaiting and self._awaiting_headers and heads == self._heads):
            return  # some of these bytes were a body (a chunk that begins a head is not counted)
        self._header_bytes += len(data)
        if self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._cancel_header_deadline()
            self.logger.warning("Request headers over %d bytes.", self.max_header_bytes)
            self.send_400_response("Invalid HTTP request received.")

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._heads += 1
        self._cancel_header_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_headers = True  # what follows is the next request (pipelined)
        self._header_bytes = 0

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a next request, complete: uvicorn starts it now
        super().on_response_complete()
        if self._awaiting_headers and not pipelined and not self.transport.is_closing():
            self._arm_header_deadline()  # the next request's headers (keep-alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._awaiting_headers and not self.transport.is_closing():
            self.transport.close()


def protocol_with_deadline(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """:class:`HeaderDeadlineProtocol` with its deadline set to ``header_timeout_s``."""
    return type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {"header_timeout_s": float(header_timeout_s)},
    )


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` (besides the app and the log level)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "http": protocol_with_deadline(settings.header_timeout_s),
        # idle keep-alive connections end at the header deadline, not at uvicorn's 5 s default,
        # which races clients polling every few seconds (their request meets a closing socket)
        "timeout_keep_alive": settings.header_timeout_s + 1,
        "proxy_headers": True,
        "forwarded_allow_ips": list(settings.forwarded_allow_ips),
    }

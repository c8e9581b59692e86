"""How ``trtforge serve`` runs uvicorn: the options, and an HTTP protocol with a header deadline.

uvicorn bounds the size of request headers (h11's 16 KiB) but not the time a client takes to
send them: its keep-alive timer only runs between requests and any byte received cancels it, so
a client that opens a connection and trickles a header byte now and then holds the connection
(and its slot against ``limit_concurrency``) for as long as it likes. No uvicorn option bounds
this, and an ASGI middleware cannot either (the app is called once the headers are complete), so
the bound lives in the protocol: :class:`HeaderDeadlineProtocol` closes a connection whose
request headers are not complete ``header_timeout_s`` after it opened or after its previous
response ended. Request bodies are not covered (a slow upload is legitimate); the app bounds
their size.

Nothing here imports the web framework, so the CLI may import it (see the import contracts).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings

__all__ = ["HeaderDeadlineProtocol", "protocol_with_deadline", "uvicorn_options"]


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not send their headers in time."""

    header_timeout_s = 10.0
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
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
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
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

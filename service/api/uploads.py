"""Receiving multipart uploads as a stream: the file part goes straight to a temporary file,
hashed and size-checked as it arrives (never held in memory or spooled twice); the small text
fields are collected up to a bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.errors import PayloadTooLargeError, UploadError
from service.store.storage import PendingFile, Storage

__all__ = ["ReceivedUpload", "multipart_openapi", "receive_upload"]

_FIELD_LIMIT_BYTES = 64 * 1024
_HEADER_LIMIT_BYTES = 8 * 1024
_FIELDS_LIMIT_BYTES = 256 * 1024
_FIELDS_LIMIT_COUNT = 32
"""All text fields together: a form of thousands of fields must not fill the server's memory."""
_OVERHEAD_BYTES = 64 * 1024
"""Multipart framing and text fields allowed on top of the file's size limit."""


@dataclass
class ReceivedUpload:
    """The received file (a pending temporary file) and the text fields."""

    file: PendingFile
    filename: str
    fields: dict[str, str]


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    text: bytearray = field(default_factory=bytearray)


class _Collector:
    """Parser callbacks: file bytes queue up for the thread that writes them."""

    def __init__(self, file_field: str) -> None:
        self.file_field = file_field
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.pending: list[bytes] = []
        self.text_bytes = 0
        self.parts = 0
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._header_data(self._header_name, d[s:e]),
            "on_header_value": lambda d, s, e: self._header_data(self._header_value, d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._part = _Part()
        self.parts += 1
        if self.parts > _FIELDS_LIMIT_COUNT + 1:
            raise PayloadTooLargeError(
                f"The form has more than {_FIELDS_LIMIT_COUNT} text fields.", field="body"
            )

    def _header_data(self, target: bytearray, data: bytes) -> None:
        target.extend(data)
        if len(target) > _HEADER_LIMIT_BYTES:
            raise UploadError("A multipart part header is longer than 8 KiB.")

    def _header_end(self) -> None:
        name = self._header_name.decode("latin-1").strip().lower()
        self._part.headers[name] = self._header_value.decode("utf-8", "replace").strip()
        self._header_name.clear()
        self._header_value.clear()

    def _headers_done(self) -> None:
        _kind, params = parse_options_header(self._part.headers.get("content-disposition", ""))
        self._part.name = params.get(b"name", b"").decode("utf-8", "replace")
        raw = params.get(b"filename")
        self._part.filename = raw.decode("utf-8", "replace") if raw is not None else None
        if self._is_file():
            if self.filename is not None:
                raise UploadError(f"More than one part named {self.file_field!r}.")
            self.filename = self._part.filename or "upload"

    def _is_file(self) -> bool:
        return self._part.name == self.file_field and self._part.filename is not None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file():
            self.pending.append(bytes(data[start:end]))
            return
        self._part.text.extend(data[start:end])
        self.text_bytes += end - start
        if len(self._part.text) > _FIELD_LIMIT_BYTES:
            raise UploadError(f"Form field {self._part.name!r} is longer than 64 KiB.")
        if self.text_bytes > _FIELDS_LIMIT_BYTES:
            raise PayloadTooLargeError("The form's text fields add up to more than 256 KiB.")

    def _end(self) -> None:
        if not self._is_file() and self._part.name:
            self.fields[self._part.name] = self._part.text.decode("utf-8", "replace")


def _write_all(target: PendingFile, chunks: list[bytes]) -> None:
    for chunk in chunks:
        target.write(chunk)


async def receive_upload(
    request: Request, storage: Storage, max_bytes: int, *, file_field: str = "file"
) -> ReceivedUpload:
    """Stream a ``multipart/form-data`` body; raises UploadError or PayloadTooLargeError.

    The caller owns the returned pending file (use it in a ``with`` block).
    """
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError("The request is not multipart/form-data.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _OVERHEAD_BYTES:
        raise PayloadTooLargeError(
            f"The upload ({int(declared)} bytes) exceeds the server's limit of {max_bytes} bytes.",
            field=file_field,
        )
    collector = _Collector(file_field)
    parser = MultipartParser(boundary, collector.callbacks())
    target = storage.pending(max_bytes=max_bytes)
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise UploadError(f"The multipart body is malformed: {exc}.") from exc
            if collector.pending:
                chunks, collector.pending = collector.pending, []
                await run_in_threadpool(_write_all, target, chunks)
        parser.finalize()
        if collector.filename is None:
            raise UploadError(f"The form has no file part named {file_field!r}.", field=file_field)
        await run_in_threadpool(target.finish)
    except BaseException:
        target.discard()
        raise
    return ReceivedUpload(file=target, filename=collector.filename, fields=collector.fields)


def multipart_openapi(fields: dict[str, str]) -> dict[str, Any]:
    """``openapi_extra`` documenting a multipart body with a ``file`` part plus text fields."""
    properties: dict[str, Any] = {"file": {"type": "string", "format": "binary"}}
    properties |= {name: {"type": "string", "description": text} for name, text in fields.items()}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": properties}
                }
            },
        }
    }

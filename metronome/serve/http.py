"""uvicorn's HTTP/1.1 protocol (httptools) with bounds on what one client may hold before its request is
whole: the bytes of its request line and headers, and the time it takes to send them; and a request past
the connection limit (uvicorn's limit_concurrency) answered in the API's error shape.

Without them, a connection that sends nothing, or headers that never end, stayed open for good (about a
thousand of them used up the process's file descriptors, and every other client's requests failed), and one
header of hundreds of megabytes was buffered whole. nginx bounds the same two things (client_header_timeout,
large_client_header_buffers); uvicorn's h11 protocol bounds the size, its httptools protocol neither.
Imported where the server starts (serve/cli.py), as uvicorn is.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from metronome.serve.errors import ApiError

MAX_HEADER_BYTES = 64 * 1024  # a request line and headers larger than this are refused (431)
HEADER_TIMEOUT_S = 30.0  # from the connection (or the end of the last response) to a request's last header


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that answers 431 to headers over MAX_HEADER_BYTES and closes a connection whose
    request's headers are not complete HEADER_TIMEOUT_S after it opened or its last response ended."""

    # Two counts: the bytes read while a request's headers are incomplete (headers that never end are refused
    # as soon as a read leaves them past the bound), and the bytes the parser found in its request line and
    # headers (headers that end within a read, beside the body's first bytes, are judged on their own size:
    # 70 KB of them in one read, or 80 KB in two, got through before).

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0  # read while in headers
        self._parsed_bytes = 0  # of the request line and headers, as parsed
        self._oversized = False  # parsed headers past the bound: nothing of the request runs; 431 after the read
        self._in_headers = True  # until the next request's headers are complete
        self._rest_timer: asyncio.TimerHandle | None = None  # an answered request's body: its time to end
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

    def data_received(self, data: bytes) -> None:
        counting = self._in_headers
        if counting:
            self._header_bytes += len(data)  # with the body's first bytes, if they came in the same read
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._oversized or (counting and self._in_headers and self._header_bytes > MAX_HEADER_BYTES):
            self._refuse(431, "Request Header Fields Too Large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._parsed_bytes = 0
        if self._header_timer is None:  # a request after a response: its own time to send its headers
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._parsed_bytes > MAX_HEADER_BYTES:
            self._oversized = True  # not handed to the app; refused once the parser returns (data_received)
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._oversized:
            super().on_body(body)

    def on_message_complete(self) -> None:
        # what comes next on the connection is the next request's headers: counted from its first read (it was
        # counted from its second, so a kept-alive request's first read escaped the size bound, and one that
        # stalled there was closed without its 408)
        self._in_headers = True
        self._header_bytes = 0
        if not self._oversized:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Answered before its body arrived (a 401, a 404, a 413): uvicorn's keep-alive timer is cancelled by
        # every read, so a client that sends a byte now and then held the connection for ever (512 of them
        # shut every other client out, key or no key). The rest of the body gets HEADER_TIMEOUT_S to arrive.
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            self._rest_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._rest_late, cycle)

    def _rest_late(self, cycle: Any) -> None:
        self._rest_timer = None
        if cycle is self.cycle and cycle.more_body and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._rest_timer is not None:
            self._rest_timer.cancel()
            self._rest_timer = None
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn hands a request past limit_concurrency to its own app, a text/plain "Service Unavailable";
        # every other error of this server is OpenAI's JSON shape, which clients parse
        super()._start_asgi_task(cycle, self._too_many_connections if app is service_unavailable else app)

    async def _too_many_connections(self, scope: Any, receive: Any, send: Any) -> None:
        error = ApiError(
            503,
            f"the server has {self.limit_concurrency} connections or requests open, its most; retry shortly",
            type="service_unavailable",
            code="too_many_connections",
            headers={"Retry-After": "1", "Connection": "close"},
        )
        await error.response()(scope, receive, send)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            if self._header_bytes:  # something came: say why it ends (nothing came: just close)
                self._refuse(408, "Request Timeout")
            else:
                self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        body = f"{reason}: the request's headers must be complete within {MAX_HEADER_BYTES} bytes and "
        body += f"{HEADER_TIMEOUT_S:g} s"
        head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        self.transport.write((head + body).encode("ascii"))
        self.transport.close()

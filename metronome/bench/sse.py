"""A lean streaming client for the load bench: one HTTP/1.1 POST per request over an asyncio stream, its
server-sent events read straight off the socket.

Why not httpx (bench/client.py, which the Artificial-Analysis-style runs use): on a 2-core machine the
client shares the cores with the server it measures, and httpx's layers (httpcore, h11, line splitting)
cost ~0.5 ms of CPU per streamed token here, a tenth of a 1-user step. This reader costs a fraction of
that (`metronome bench --load` prints the client's CPU per token beside the server's), so what the
served figures lose against in process is the server's doing, not the bench's. It speaks just enough
HTTP for a loopback server: a status line, headers, a chunked or close-delimited body.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

_LIMIT = 1 << 20  # the longest header line or chunk-size line accepted


class SseError(Exception):
    """The server answered something other than a 200 event stream, or broke off mid-stream."""


async def post_events(host: str, port: int, path: str, body: dict) -> AsyncIterator[bytes]:
    """POST `body` as JSON and yield the `data:` payload of each server-sent event until `[DONE]` (not
    yielded) or the end of the stream. Raises SseError on a non-200 answer or a malformed body; the caller
    bounds the whole exchange with its own timeout."""
    reader, writer = await asyncio.open_connection(host, port, limit=_LIMIT)
    try:
        payload = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        status = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status.split(b" ", 2)[1:2] != [b"200"]:
            rest = await reader.read(2000)
            raise SseError(f"{status.decode('latin-1').strip()}: {rest.decode('utf-8', 'replace')}")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        pending = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                data = data[:-2]
            else:
                data = await reader.read(1 << 16)
                if not data:
                    break
            pending += data
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        value = line[5:].strip()
                        if value == b"[DONE]":
                            return
                        yield value
        raise SseError("the stream ended before its final 'data: [DONE]'")
    except (asyncio.IncompleteReadError, ValueError) as exc:
        raise SseError(f"malformed response body: {exc}") from exc
    finally:
        writer.close()

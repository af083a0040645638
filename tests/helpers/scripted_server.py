"""A loopback HTTP server that answers every connection with the same scripted bytes, for the bench clients' tests.

`ScriptedServer(parts)` listens on 127.0.0.1 in a thread; on each connection it reads the request (head and
Content-Length body, kept in `requests`), then sends `parts` in order: bytes are written as they are, a float is
a pause in seconds, HOLD keeps the connection open (sending nothing) until the server is closed. Then it closes
the connection, with a TCP reset when `reset` is set (as a crashed server's kernel sends). Every wait is bounded.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Sequence

HOLD = object()  # a part: send nothing more until the server is closed (a hung server)


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse_head(status: str = "200 OK", chunked: bool = True) -> bytes:
    framing = "Transfer-Encoding: chunked\r\n" if chunked else "Connection: close\r\n"
    return f"HTTP/1.1 {status}\r\nContent-Type: text/event-stream\r\n{framing}\r\n".encode()


class ScriptedServer:
    def __init__(self, parts: Sequence[bytes | float | object], reset: bool = False) -> None:
        self.parts, self.reset = list(parts), reset
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    self._answer(conn)
                except OSError:  # the client under test hung up mid-script (its timeout, a dropped stream)
                    continue

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            got = conn.recv(65536)
            if not got:
                return
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
            0,
        )
        while len(body) < length:
            got = conn.recv(65536)
            if not got:
                break
            body += got
        self.requests.append(head + b"\r\n\r\n" + body)
        for part in self.parts:
            if part is HOLD:
                self._stop.wait(timeout=30)
            elif isinstance(part, float):
                time.sleep(part)
            else:
                conn.sendall(part)
        if self.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.shutdown(socket.SHUT_WR)

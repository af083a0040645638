"""The HTTP protocol `metronome serve` runs (serve/http.py): a request's headers are bounded in size and in
the time they take to arrive, so that no client holds a connection, or the server's memory, for as long as
it likes; ordinary requests, large bodies and keep-alive are untouched. Raw sockets, as such clients are."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from helpers.live_server import LiveServer

from metronome.serve import http
from metronome.serve.server import ServerSettings, create_app


@pytest.fixture
def url(monkeypatch):
    monkeypatch.setattr(http, "HEADER_TIMEOUT_S", 1.0)
    with LiveServer(create_app(None, ServerSettings())) as url:
        yield url


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (bounded by the socket's timeout)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_headers_past_the_size_bound_end_the_connection(url):
    """One header of hundreds of megabytes was buffered whole (the server's memory grew by its size), and
    the server waited for more. Now it answers 431 and closes once the headers pass the bound (the answer
    may be lost to the reset its unread bytes cause: either way the connection ends)."""
    with _connect(url) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * http.MAX_HEADER_BYTES))
            answer = _read_all(sock)  # a socket.timeout here: the server still waits for the header's end
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]


@pytest.mark.parametrize("reads", [1, 2])
def test_headers_past_the_bound_that_end_within_a_read_are_refused_too(url, reads):
    """70 KB of headers in one read, or 80 KB in two, got a 200: the bound was checked only while the headers
    were still incomplete after a read, so headers that ended within one were never held to it."""
    size = http.MAX_HEADER_BYTES + 8 * 1024
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    with _connect(url) as sock:
        cut = len(request) // reads
        for i in range(reads):
            sock.sendall(request[i * cut : None if i == reads - 1 else (i + 1) * cut])
            time.sleep(0.2)  # separate reads on the server
        assert _read_all(sock).startswith(b"HTTP/1.1 431 ")


def test_a_connection_that_sends_nothing_or_half_a_request_is_closed(url):
    """Both stayed open for good: about a thousand of them used up the file descriptors, and every other
    client's requests failed."""
    with _connect(url) as idle, _connect(url) as half:
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        started = time.monotonic()
        assert _read_all(idle) == b""  # closed without a word: nothing was asked
        assert _read_all(half).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 5.0


def test_ordinary_requests_large_bodies_and_keep_alive_are_untouched(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(3):  # one connection, kept alive across requests further apart than nothing
            assert client.get("/metrics").status_code == 200
        # a body far over the header bound, arriving in the same reads as the headers: not a 431
        r = client.post("/v1/completions", content=b'{"prompt": "' + b"a" * 300_000 + b'"}')
        assert r.status_code == 503  # no model attached: the app's answer, not the protocol's
        time.sleep(1.5)  # past the header bound's time, idle between requests: the keep-alive's business
        assert client.get("/metrics").status_code == 200


def test_a_body_that_trickles_in_is_refused_with_a_408(tiny_hf, monkeypatch):
    """A client sending its body a byte a second held its connection and its handler for as long as it liked."""
    from helpers.live_server import serving

    from metronome.config import EngineConfig
    from metronome.model.loader import load
    from metronome.serve import server

    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 1.0)
    with serving(load(tiny_hf("llama")), EngineConfig(slots=1, ctx=64)) as url, _connect(url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        sock.sendall(b"Content-Length: 100\r\n\r\n{")  # and nothing more
        started = time.monotonic()
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in head.replace(b" ", b"")
        assert time.monotonic() - started < 5.0


def test_a_large_body_is_validated_off_the_event_loop(tiny_hf, monkeypatch):
    """Validating megabytes of JSON takes seconds; on the event loop that stalled every other user's stream
    (2 s for 100,000 messages). A small body stays on the loop (a thread hop would cost more than it)."""
    import threading

    from helpers.live_server import serving

    from metronome.config import EngineConfig
    from metronome.model.loader import load
    from metronome.serve.schemas import ChatBody

    seen: list[str] = []
    real = ChatBody.model_validate_json

    def recording(raw, *args, **kwargs):
        seen.append(threading.current_thread().name)
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(ChatBody, "model_validate_json", recording)
    small = {"messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 1}
    large = {"messages": [{"role": "user", "content": "w1"}] * 20_000, "max_tokens": 1}
    with serving(load(tiny_hf("llama")), EngineConfig(slots=1, ctx=64)) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=small, timeout=60).status_code in (200, 400)
        assert httpx.post(f"{url}/v1/chat/completions", json=large, timeout=60).status_code == 400  # too long
        # the Responses route too (it validated 4 MB bodies on the loop): its body, then the chat body it makes
        responses = {"input": [{"role": "user", "content": "w1"}] * 20_000, "max_output_tokens": 1}
        assert httpx.post(f"{url}/v1/responses", json=responses, timeout=60).status_code == 400
    on_loop, off_loop, responses_chat = seen
    assert not on_loop.startswith(("asyncio_", "uvloop_")), seen  # the loop thread (LiveServer runs it)
    assert off_loop.startswith(("asyncio_", "uvloop_")), seen  # the loop's default executor (to_thread)
    assert responses_chat.startswith(("asyncio_", "uvloop_")), seen


def test_a_request_past_the_connection_limit_is_a_503_in_the_api_error_shape():
    """Past the connection limit (MAX_CONNECTIONS in `metronome serve`) uvicorn answered its own text/plain
    "Service Unavailable", the one error of the server a client could not parse as OpenAI's."""
    with LiveServer(create_app(None, ServerSettings()), limit_concurrency=3) as url:
        idle = [_connect(url) for _ in range(3)]  # open, and silent: each counts
        try:
            time.sleep(0.2)
            r = httpx.get(f"{url}/health", timeout=10)
        finally:
            for sock in idle:
                sock.close()
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["code"] == "too_many_connections" and r.headers["Retry-After"] == "1"
        time.sleep(0.2)
        again = httpx.get(f"{url}/health", timeout=10)  # the idle connections are gone: served again
        assert again.status_code == 200 or again.json()["error"]["code"] != "too_many_connections", again.text


def test_an_answered_request_whose_body_trickles_in_is_closed(url):
    """A request answered before its body (here a 404): a byte every few seconds kept the connection for
    ever, uvicorn's keep-alive timer cancelled by each read; 512 of them shut everyone out. The rest of the
    body gets HEADER_TIMEOUT_S (1 s here) to arrive."""
    with _connect(url) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:60]
        started, closed = time.monotonic(), False
        while time.monotonic() - started < 8:
            try:
                sock.sendall(b"x")
                sock.settimeout(0.3)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed and time.monotonic() - started < 5.0


def test_head_answers_where_get_does_and_a_trailing_slash_is_not_redirected(url):
    """HEAD (monitors, `curl -I`) was a 405 on every GET route; a path with a trailing slash was a 307 to a
    URL built from whatever Host the client sent. Now HEAD gets the GET's status and headers without a body,
    HEAD stays out of the OpenAPI document, and "/metrics/" is a 404 in the API's error shape."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/", "/metrics", "/health", "/v1/models", "/v1/models/x"):
            get, head = client.get(path), client.head(path)
            assert head.status_code == get.status_code != 405, (path, head.status_code, get.status_code)
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
        operations = {method for item in client.get("/openapi.json").json()["paths"].values() for method in item}
        assert "head" not in operations and "get" in operations
        for method, path in (("GET", "/metrics/"), ("POST", "/v1/chat/completions/")):
            r = client.request(method, path, headers={"Host": "evil.example"} if method == "GET" else {})
            assert r.status_code in (403, 404) and "location" not in r.headers, (path, r.status_code, r.headers)
            assert r.json()["error"]["message"], path
        r = client.get("/metrics/")
        assert r.status_code == 404 and "location" not in r.headers


def _response(sock: socket.socket) -> bytes:
    """One whole response (its headers, then content-length bytes of body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_a_kept_alive_connection_gives_each_request_its_own_time_for_its_headers(url):
    """The header timer ends with a request's headers; the next request on the connection gets its own, or a
    client that sent one request and then half of another held the connection for good."""
    with _connect(url) as sock:
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(sock).startswith(b"HTTP/1.1 404 ")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        started = time.monotonic()
        assert _read_all(sock).startswith(b"HTTP/1.1 408 ")  # it was closed without a word
        assert time.monotonic() - started < 5.0


def test_a_large_body_then_headers_in_three_reads_on_the_same_connection_are_not_a_431(url):
    """The count of header bytes starts again with each request: a kept-alive request after one whose 60 KB
    body came in the same read as its headers is judged on its own headers."""
    with _connect(url) as sock:
        body = b"x" * 60_000
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert _response(sock).startswith(b"HTTP/1.1 404 ")
        for part in (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n", b"X-Pad: " + b"p" * 10_000 + b"\r\n", b"\r\n"):
            sock.sendall(part)
            time.sleep(0.2)  # a read of its own: the headers are incomplete after the first two
        assert _response(sock).startswith(b"HTTP/1.1 404 ")

"""An async streaming client for OpenAI-compatible servers that timestamps every content chunk.

A request never raises for a server's or the network's fault: the failure is returned in the
trace (`error_kind`, `error`) so that the runner counts it and goes on.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from metronome.bench.metrics import StreamTrace


class Api(enum.Enum):
    """Which OpenAI endpoint carries the prompt."""

    CHAT = "chat"
    COMPLETIONS = "completions"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self is Api.CHAT else "/v1/completions"


@dataclass(frozen=True)
class RequestSpec:
    """One request: the prompt and how many tokens to ask for."""

    prompt: str
    max_tokens: int
    ignore_eos: bool
    temperature: float


def normalize_base_url(url: str) -> str:
    """`http://host:port` from what a user typed (a trailing `/` or `/v1` is dropped)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--url {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def request_body(api: Api, model: str, spec: RequestSpec) -> dict:
    """The JSON body: streamed, usage requested, length forced with max_tokens (+ ignore_eos)."""
    body: dict = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if api is Api.CHAT:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


@dataclass(frozen=True)
class ModelChoice:
    """The model id to send, and how it was found (for the report)."""

    model: str
    how: str


async def discover_model(http: httpx.AsyncClient, base_url: str) -> ModelChoice:
    """The first id listed by `GET /v1/models`. Raises ConnectionError if the server is unreachable."""
    try:
        response = await http.get(f"{base_url}/v1/models")
    except httpx.HTTPError as exc:
        raise ConnectionError(
            f"cannot reach {base_url}/v1/models ({type(exc).__name__}: {exc}); "
            "check that the server is running and --url is right"
        ) from exc
    if response.status_code != 200:
        return ModelChoice("default", f"GET /v1/models answered HTTP {response.status_code}; sent 'default'")
    try:
        listed = response.json()["data"]
        return ModelChoice(str(listed[0]["id"]), "first id from GET /v1/models")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return ModelChoice("default", f"GET /v1/models gave no model id ({type(exc).__name__}); sent 'default'")


def _content_texts(event: dict) -> list[str]:
    """The content text carried by one SSE event (completions `text` or chat `delta.content`)."""
    texts = []
    for choice in event.get("choices") or ():
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            texts.append(text)
    return texts


class _Trace:
    """Accumulates one stream's observations; `freeze` makes the immutable StreamTrace.

    `sent` starts as the time the request was handed to httpx and is moved to the moment httpcore
    starts writing the request headers (its "trace" extension), so that the client library's own
    overhead (pool, encoding: 0.5-5 ms, 30+ ms on a fresh connection) is not charged to the server.
    """

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.on_wire = False
        self.times: list[float] = []
        self.texts: list[str] = []
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    async def httpcore_event(self, name: str, info: dict) -> None:
        if not self.on_wire and name.endswith("send_request_headers.started"):
            self.sent = time.perf_counter()
            self.on_wire = True

    def freeze(self, error_kind: str | None = None, error: str | None = None) -> StreamTrace:
        return StreamTrace(
            chunk_times=tuple(self.times),
            chunk_texts=tuple(self.texts),
            end_s=time.perf_counter() - self.sent,
            usage_prompt_tokens=self.prompt_tokens,
            usage_completion_tokens=self.completion_tokens,
            error_kind=error_kind,
            error=error,
        )


class _StreamError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


async def _read_stream(response: httpx.Response, trace: _Trace) -> None:
    """Consume the SSE body into `trace`; raises _StreamError on anything but a clean [DONE]."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError as exc:
            raise _StreamError("bad_sse", f"malformed SSE data {payload[:120]!r}: {exc}") from exc
        if not isinstance(event, dict):
            raise _StreamError("bad_sse", f"SSE data is not a JSON object: {payload[:120]!r}")
        if event.get("error"):
            raise _StreamError("server_error", f"error event in stream: {json.dumps(event['error'])[:300]}")
        now = time.perf_counter() - trace.sent
        for text in _content_texts(event):
            trace.times.append(now)
            trace.texts.append(text)
        usage = event.get("usage")
        if isinstance(usage, dict):
            trace.prompt_tokens = usage.get("prompt_tokens", trace.prompt_tokens)
            trace.completion_tokens = usage.get("completion_tokens", trace.completion_tokens)
    raise _StreamError("incomplete", "the stream ended without its final 'data: [DONE]'")


async def stream_request(
    http: httpx.AsyncClient,
    base_url: str,
    api: Api,
    model: str,
    spec: RequestSpec,
    timeout_s: float,
) -> StreamTrace:
    """Send one streamed request and timestamp its chunks; failures come back inside the trace."""
    body = request_body(api, model, spec)
    trace = _Trace(time.perf_counter())
    try:
        async with asyncio.timeout(timeout_s):
            extensions = {"trace": trace.httpcore_event}
            async with http.stream("POST", f"{base_url}{api.path}", json=body, extensions=extensions) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", "replace")[:300]
                    return trace.freeze(f"http_{response.status_code}", f"HTTP {response.status_code}: {detail}")
                await _read_stream(response, trace)
    except _StreamError as exc:
        return trace.freeze(exc.kind, str(exc))
    except TimeoutError:
        return trace.freeze("timeout", f"no complete response within {timeout_s:g} s (--request-timeout)")
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return trace.freeze("dropped", f"connection dropped mid-response: {type(exc).__name__}: {exc}")
    except httpx.HTTPError as exc:
        return trace.freeze("transport", f"{type(exc).__name__}: {exc}")
    return trace.freeze()

"""The speech endpoints' request handling (serve/audio.py) with a stub transcriber, no model: the upload's
byte limits, each form field as the transcriber receives it, and the refusals' status and headers. The
real Whisper behind the same routes is tests/serve/test_audio_api.py."""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest
from helpers.live_server import LiveServer
from helpers.wav import pcm_wav

from metronome.audio.types import Segment, Transcript, TranscriptTimings
from metronome.serve.audio import SpeechService, SpeechSettings
from metronome.serve.server import ServerSettings, create_app

LIMIT = 1000  # max_file_bytes here: a wav of exactly this size fits, two bytes more do not
WAV_HEADER = 44  # the stdlib writer's PCM header


def _wav(n_samples: int) -> bytes:
    return pcm_wav(np.sin(np.arange(n_samples) * 0.3) * 8000)


class Stub:
    """A transcriber that says one fixed segment and records the options of each call."""

    name = "stub-whisper"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def close(self) -> None:
        pass

    def transcribe(self, samples, *, on_segment=None, stop=None, **options) -> Transcript:
        self.calls.append(options)
        segment = Segment(0, 0.0, 0.5, " Hello there.", (1, 2), -0.1, 0.0, options["temperature"], 1.0)
        if on_segment is not None:
            on_segment(segment)
        seconds = len(samples) / 16000
        timings = TranscriptTimings(seconds, 0.1, 0.1, 0.1, 0.3)
        return Transcript("Hello there.", options.get("language") or "en", seconds, (segment,), timings)


@pytest.fixture(scope="module")
def stub() -> Stub:
    return Stub()


@pytest.fixture(scope="module")
def url(stub):
    service = SpeechService(SpeechSettings(max_file_bytes=LIMIT, max_pending=4, timeout_s=30))
    service.attach(stub)
    try:
        with LiveServer(create_app(None, ServerSettings(), speech=service)) as url:
            yield url
    finally:
        service.stop()


def _post(url: str, audio: bytes, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("a.wav", audio)}, data=fields, timeout=30)


def test_a_file_of_exactly_the_limit_is_read_and_one_past_it_is_a_413(url):
    fits = _wav((LIMIT - WAV_HEADER) // 2)
    assert len(fits) == LIMIT
    r = _post(url, fits)
    assert r.status_code == 200 and r.json()["text"] == "Hello there.", r.text
    over = _wav((LIMIT - WAV_HEADER) // 2 + 1)
    r = _post(url, over)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large", r.text
    assert r.json()["error"]["param"] == "file"


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_an_upload_past_the_limit_is_refused_before_it_is_all_sent(url, monkeypatch):
    """The form is refused as soon as its bytes pass the limit (the file's, plus 1 MB of form slack): by the
    Content-Length it declares before any body byte, or, sent chunked, once the bytes read pass it; not
    read to its end (here it never ends: that would be a 408 once BODY_TIMEOUT_S passed)."""
    from metronome.serve import server

    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 3.0)
    head = "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    with _connect(url) as sock:
        sock.sendall(f"{head}Content-Length: {LIMIT + (1 << 20) + 1}\r\n\r\n--b\r\n".encode())  # and no more
        started = time.monotonic()
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 ") and b"file_too_large" in answer, answer[:200]
        assert time.monotonic() - started < 2.5
    with _connect(url) as sock:
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 65536
        for _ in range(((1 << 20) + LIMIT) // len(chunk) + 2):  # past the limit, then nothing more
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        started = time.monotonic()
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 ") and b"file_too_large" in answer, answer[:200]
        assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(
    "fields, seen",
    [
        ({"temperature": "0"}, {"temperature": 0.0}),  # both ends of [0, 1] are temperatures
        ({"temperature": "1"}, {"temperature": 1.0}),
        ({"language": " EN "}, {"language": "en"}),  # ISO-639-1 codes in any case
        ({}, {"temperature": 0.0, "language": None, "prompt": None, "task": "transcribe"}),
    ],
)
def test_form_fields_reach_the_transcriber_as_read(url, stub, fields, seen):
    r = _post(url, _wav(400), **fields)
    assert r.status_code == 200, r.text
    assert {k: stub.calls[-1][k] for k in seen} == seen


@pytest.mark.parametrize("value", ["true", "True", " TRUE "])
def test_stream_is_a_boolean_in_any_case(url, value):
    r = _post(url, _wav(400), stream=value)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["transcript.text.delta", "transcript.text.done"]


def test_a_field_given_twice_is_refused_naming_it(url):
    r = httpx.post(
        f"{url}/v1/audio/transcriptions",
        files=[("file", ("a.wav", _wav(400))), ("language", (None, "en")), ("language", (None, "de"))],
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "language" and "2 times" in r.json()["error"]["message"]


def test_a_loading_speech_model_says_when_to_retry():
    loading = SpeechService(SpeechSettings(retry_after_s=7))
    with LiveServer(create_app(None, ServerSettings(), speech=loading)) as url:
        r = _post(url, _wav(400))
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    assert r.headers["retry-after"] == "7"


def test_a_file_that_is_not_audio_is_named_by_its_filename(url):
    r = httpx.post(
        f"{url}/v1/audio/transcriptions", files={"file": ("notes.txt", b"not a recording " * 20)}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio", r.text
    assert r.json()["error"]["message"].startswith("notes.txt: ") and r.json()["error"]["param"] == "file"


def test_the_openapi_document_describes_the_speech_form(url):
    """The handlers parse the multipart form themselves, so FastAPI cannot see it: serve/openapi.py writes
    it (clients are generated from it, and the fuzzer sends what it says)."""
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        operation = doc["paths"][path]["post"]
        form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert operation["requestBody"]["required"] and form["required"] == ["file"]
        assert form["properties"]["file"]["format"] == "binary"
        assert form["properties"]["temperature"] == {"type": "number", "minimum": 0, "maximum": 1}
        assert form["properties"]["response_format"]["enum"] == ["json", "text", "srt", "vtt", "verbose_json"]
        assert {"application/json", "text/plain", "text/vtt", "application/x-subrip", "text/event-stream"} == set(
            operation["responses"]["200"]["content"]
        )

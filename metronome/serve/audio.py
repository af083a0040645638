"""Speech to text over HTTP: OpenAI's `POST /v1/audio/transcriptions` and `/v1/audio/translations`.

A `SpeechService` owns the Whisper transcriber and the worker threads that call it (its plan batches the
decoder rows of concurrent calls), so the event loop never waits on the model. A request is admitted
first (a bounded count of requests in the speech path: beyond it a 429, before the upload is even read),
then its multipart form is checked field by field (a 400 naming the field), the file decoded on a thread
(`audio/decode.py`), and the samples queued for the workers; the handler awaits the transcript with a
timeout (504). The response is rendered in the requested format (`audio/formats.py`) with the timings in
`usage` and in a `Server-Timing` header; with `stream=true`, as server-sent events, a delta per segment as
its window is decoded (`_stream`).
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from metronome.audio.decode import MAX_SECONDS, AudioError, DecodedAudio, decode_audio
from metronome.audio.formats import LANGUAGE_NAMES, ResponseFormat, render
from metronome.audio.types import Segment, Transcript, TranscriptionStopped
from metronome.config import ParamError, check_fields, is_integer, is_number
from metronome.serve.errors import ApiError, busy, shutting_down

if TYPE_CHECKING:
    from metronome.serve.server import ServerState

SPEECH_ALIAS = "whisper-1"  # OpenAI's name, accepted as the model name too
TRANSCRIPTIONS, TRANSLATIONS = "/v1/audio/transcriptions", "/v1/audio/translations"
GRANULARITIES = ("timestamp_granularities[]", "timestamp_granularities")  # the openai client sends the first
_FORM_SLACK = 1 << 20  # the form's text fields and multipart framing, on top of the file
T = TypeVar("T")


@dataclass(frozen=True)
class SpeechSettings:
    max_file_bytes: int = 25 << 20  # OpenAI's upload limit; a larger file gets 413
    max_seconds: float = MAX_SECONDS  # longer audio gets 400
    max_pending: int = 16  # requests in the speech path (uploading, decoding, queued, running); then 429
    # threads calling the transcriber at once: its plan batches their decoder rows in its slots (4 by default)
    workers: int = 4
    # uploads decoded at once: a decode holds up to 4 bytes x 16,000 a second of audio (460 MB for two hours,
    # which FLAC of silence holds in 1.6 MB), so 16 admitted at once could take gigabytes
    decoders: int = 2
    timeout_s: float = 600.0  # the longest a request waits for its transcript (queue and run) before 504
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        # kinds first: 2.5 workers or an infinite max_pending were taken, and a retry_after_s of NaN reached the
        # Retry-After header
        check_fields(
            self,
            [(name, is_integer(getattr(self, name)), "must be an integer") for name in _SPEECH_INTS]
            + [
                (name, is_number(getattr(self, name)), "must be a finite number")
                for name in ("max_seconds", "timeout_s")
            ],
        )
        check_fields(
            self,
            [(name, getattr(self, name) > 0, "must be positive") for name in _SPEECH_INTS if name != "retry_after_s"]
            + [
                ("max_seconds", self.max_seconds > 0, "must be positive"),
                ("timeout_s", self.timeout_s > 0, "must be positive"),
                ("retry_after_s", self.retry_after_s >= 0, "must be 0 or more seconds"),
            ],
        )


_SPEECH_INTS = ("max_file_bytes", "max_pending", "workers", "decoders", "retry_after_s")


class Transcribing(Protocol):
    """What the service needs of `metronome.audio.transcribe.Transcriber`."""

    name: str  # the id the API serves it under

    def close(self) -> None: ...

    def transcribe(
        self,
        samples: np.ndarray,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        task: str = "transcribe",
        on_segment: Callable[[Segment], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Transcript: ...


class SpeechBusy(Exception):
    """Too many requests in the speech path: answered 429."""


@dataclass
class _Job:
    samples: np.ndarray
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)
    # the caller stopped waiting (its client left, or it timed out): a queued job is skipped, and a running
    # one stops before its next 30-s window (Transcriber.transcribe's `stop`)
    abandoned: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class SpeechResult:
    transcript: Transcript
    queue_s: float  # from queued to the worker taking it
    run_s: float  # the transcriber's call


class SpeechService:
    """A transcriber behind `settings.workers` worker threads and a bounded admission count."""

    _IDLE_WAKE_S = 60.0  # the worker's wait for work has a timeout like every wait; it only loops on it

    def __init__(self, settings: SpeechSettings | None = None) -> None:
        self.model_id = ""  # the transcriber's name, once attached
        self.settings = settings or SpeechSettings()
        self.created = int(time.time())
        self._transcriber: Transcribing | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue()  # bounded by the admission count, not here
        self._lock = threading.Lock()
        self._pending = 0
        self._workers: list[threading.Thread] = []
        self._decoding = threading.BoundedSemaphore(self.settings.decoders)

    @property
    def ready(self) -> bool:
        return self._transcriber is not None

    @property
    def pending(self) -> int:
        """Requests in the speech path now (admitted, not yet answered)."""
        with self._lock:
            return self._pending

    def decode(self, data: bytes) -> DecodedAudio:
        """An upload's samples (a blocking call, off the event loop), at most `decoders` at once."""
        with self._decoding:
            return decode_audio(data, self.settings.max_seconds)

    def names(self) -> tuple[str, str]:
        return (self.model_id, SPEECH_ALIAS)

    def attach(self, transcriber: Transcribing) -> None:
        """Serve `transcriber`: start the workers that call it."""
        if self._transcriber is not None:
            raise RuntimeError("SpeechService.attach: a transcriber is already attached")
        self._transcriber = transcriber
        self.model_id = transcriber.name
        self._workers = [
            threading.Thread(target=self._work, name=f"metronome-speech-{i}", daemon=True)
            for i in range(self.settings.workers)
        ]
        for worker in self._workers:
            worker.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the workers once the jobs they run (if any) end, then close the transcriber; queued jobs
        are dropped (their requests time out)."""
        if not self._workers:
            return
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if not any(worker.is_alive() for worker in self._workers):
            self._transcriber.close()
        self._workers = []

    def admit(self) -> None:
        """Count one request into the speech path, or raise SpeechBusy; `release` it when done."""
        with self._lock:
            if self._pending >= self.settings.max_pending:
                raise SpeechBusy(f"{self._pending} speech requests are already in progress")
            self._pending += 1

    def release(self) -> None:
        with self._lock:
            self._pending -= 1

    async def transcribe(self, samples: np.ndarray, **options: Any) -> SpeechResult:
        """The transcript of `samples` (options: language, prompt, temperature, task), run on a worker;
        TimeoutError after settings.timeout_s."""
        loop = asyncio.get_running_loop()
        job = _Job(samples, options, loop, loop.create_future())
        self._queue.put(job)
        try:
            return await asyncio.wait_for(job.future, self.settings.timeout_s)
        finally:
            job.abandoned.set()  # a job not started yet is skipped; one running stops at its next window

    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=self._IDLE_WAKE_S)
            except queue.Empty:
                continue
            if job is None:
                return
            if job.abandoned.is_set():
                continue
            started = time.perf_counter()
            try:
                transcript = self._transcriber.transcribe(job.samples, stop=job.abandoned, **job.options)
            except TranscriptionStopped:  # nobody waits for it any more
                continue
            except Exception as exc:  # handed to the request that asked: it answers the client with it
                self._deliver(job, exc, None)
                continue
            result = SpeechResult(transcript, started - job.queued, time.perf_counter() - started)
            self._deliver(job, None, result)

    @staticmethod
    def _deliver(job: _Job, error: Exception | None, result: SpeechResult | None) -> None:
        def settle() -> None:
            if job.future.done():  # the waiter timed out or went away
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        if not job.loop.is_closed():
            job.loop.call_soon_threadsafe(settle)


# -- the request -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechForm:
    data: bytes
    filename: str
    model: str | None
    language: str | None
    prompt: str | None
    response_format: ResponseFormat
    temperature: float
    stream: bool = False  # the text as server-sent events, a delta per segment as it is decoded


async def _form(request: Request, settings: SpeechSettings) -> FormData:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):  # any case (RFC 9110)
        raise ApiError(400, "send the audio as multipart/form-data with the recording in the field 'file'", "file")
    limit = settings.max_file_bytes + _FORM_SLACK
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(settings)
    from metronome.serve.server import BODY_TIMEOUT_S  # server.py imports this module

    chunks, size = [], 0
    try:  # as the JSON routes: an upload trickling in held its handler and one of the speech admissions for ever
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(settings)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the upload did not arrive within {BODY_TIMEOUT_S:g} s", code="request_timeout") from None

    async def body() -> AsyncIterator[bytes]:
        yield b"".join(chunks)

    parser = MultiPartParser(request.headers, body(), max_files=4, max_fields=16, max_part_size=_FORM_SLACK)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"the multipart form is malformed: {exc.message}") from None


def _too_large(settings: SpeechSettings) -> ApiError:
    mb = settings.max_file_bytes / (1 << 20)
    return ApiError(
        413,
        f"the file is larger than {mb:g} MB; send a shorter or more compressed recording",
        "file",
        code="file_too_large",
    )


def _text(form: FormData, name: str) -> str | None:
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"'{name}' is given {len(values)} times; give it once", name)
    if not isinstance(values[0], str):
        raise ApiError(400, f"'{name}' must be a text field, not a file", name)
    return values[0]


async def parse_form(request: Request, settings: SpeechSettings) -> SpeechForm:
    """The request's multipart form, every field checked; ApiError naming the first bad field."""
    form = await _form(request, settings)
    try:
        files = form.getlist("file")
        if not files:
            raise ApiError(400, "the form has no 'file' field: attach the recording as 'file'", "file")
        if len(files) > 1 or not isinstance(files[0], UploadFile):
            raise ApiError(400, "'file' must be one uploaded file (a form file part, not text)", "file")
        upload: UploadFile = files[0]
        data = await upload.read()
        if len(data) > settings.max_file_bytes:
            raise _too_large(settings)

        fmt_text = _text(form, "response_format") or ResponseFormat.JSON.value
        if fmt_text not in ResponseFormat.choices():
            raise ApiError(
                400,
                f"response_format={fmt_text!r}: choose one of {', '.join(ResponseFormat.choices())}",
                "response_format",
            )
        fmt = ResponseFormat(fmt_text)

        temperature = 0.0
        t_text = _text(form, "temperature")
        if t_text is not None:
            try:
                temperature = float(t_text)
            except ValueError:
                raise ApiError(
                    400, f"temperature={t_text!r} is not a number; give one in [0, 1]", "temperature"
                ) from None
            if not (math.isfinite(temperature) and 0.0 <= temperature <= 1.0):
                raise ApiError(400, f"temperature={t_text}: must be in [0, 1]", "temperature")

        stream = (_text(form, "stream") or "false").strip().lower()
        if stream not in ("true", "false"):
            raise ApiError(400, f"stream={stream!r}: send true or false", "stream")
        if stream == "true" and fmt not in _STREAMED:
            raise ApiError(
                400,
                f"response_format={fmt.value!r} is not streamed; stream json or text, or leave stream out",
                "response_format",
            )

        language = _text(form, "language")
        if language is not None:
            language = language.strip().lower()
            if language not in LANGUAGE_NAMES:
                raise ApiError(
                    400, f"language={language!r} is not an ISO-639-1 code Whisper knows (e.g. 'en', 'de')", "language"
                )

        for name in GRANULARITIES:
            for g in form.getlist(name):
                if g == "word":
                    raise ApiError(
                        400,
                        "word timestamps are not produced by this server; ask for 'segment' (verbose_json segments)",
                        name,
                    )
                if g != "segment":
                    raise ApiError(400, f"{name}={g!r}: the only granularity served is 'segment'", name)
                if fmt is not ResponseFormat.VERBOSE_JSON:
                    raise ApiError(400, f"{name} needs response_format=verbose_json", name)

        return SpeechForm(
            data=data,
            filename=upload.filename or "audio",
            model=_text(form, "model"),
            language=language,
            prompt=_text(form, "prompt"),
            response_format=fmt,
            temperature=temperature,
            stream=stream == "true",
        )
    finally:
        await form.close()


# -- the routes ---------------------------------------------------------------------------------------


def speech_card(speech: SpeechService) -> dict[str, Any]:
    # `kind` is metronome's own field: the chat page finds the speech model by it
    return {
        "id": speech.model_id,
        "object": "model",
        "created": speech.created,
        "owned_by": "metronome",
        "kind": "speech-to-text",
    }


def _require(state: ServerState) -> SpeechService:
    speech = state.speech
    if speech is None:
        raise ApiError(
            404,
            "this server serves no speech model (started with --speech-model none)",
            "model",
            code="model_not_found",
        )
    if not speech.ready:
        raise ApiError(
            503,
            "the speech model is still loading; retry shortly",
            type="service_unavailable",
            code="model_loading",
            headers={"Retry-After": str(speech.settings.retry_after_s)},
        )
    return speech


async def answer(request: Request, state: ServerState, task: str) -> Response:
    """One transcription or translation request, admission to response."""
    speech = _require(state)
    state.refuse_if_stopping()
    try:
        speech.admit()
    except SpeechBusy as exc:
        raise busy(f"{exc}; retry shortly", speech.settings.retry_after_s) from None
    streaming = False
    try:
        response = await _answer(request, speech, task, state.ending, state.metrics.observe_speech)
        streaming = isinstance(response, _SpeechStream)  # it releases the admission when it ends
        return response
    finally:
        if not streaming:
            speech.release()


async def _answer(
    request: Request,
    speech: SpeechService,
    task: str,
    ending: asyncio.Event,
    observe: Callable[[dict[str, Any]], None],
) -> Response:
    """`observe` records each transcript delivered (ServerMetrics.observe_speech)."""
    form = await parse_form(request, speech.settings)
    if form.model is not None and form.model not in speech.names():
        raise ApiError(
            404,
            f"the model {form.model!r} does not transcribe here; this server's speech model is "
            f"{speech.model_id!r} (also called {SPEECH_ALIAS!r})",
            "model",
            code="model_not_found",
        )
    started = time.perf_counter()
    try:
        audio: DecodedAudio = await asyncio.to_thread(speech.decode, form.data)
    except AudioError as exc:
        raise ApiError(400, f"{form.filename}: {exc}", exc.param, code="invalid_audio") from None
    decoded = time.perf_counter()
    options = dict(language=form.language, prompt=form.prompt, temperature=form.temperature, task=task)
    if form.stream:
        return await _stream(request, speech, audio, options, started, decoded, ending, observe)
    try:
        result = await _unless_gone(request, speech.transcribe(audio.samples, **options), ending)
    except (TimeoutError, ValueError) as exc:
        raise _failed(exc, speech) from None
    total = time.perf_counter() - started
    usage = _usage(result, decoded - started, total)
    observe(usage)
    body = render(result.transcript, form.response_format, usage)
    headers = {"Server-Timing": _server_timing(usage)}
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return PlainTextResponse(body, media_type=form.response_format.media_type, headers=headers)


async def _unless_gone(request: Request, transcribing: Awaitable[T], ending: asyncio.Event) -> T:
    """`transcribing`'s result, or ClientDisconnect (a 499 nobody reads) as soon as the client goes away: the
    job is then dropped (SpeechService.transcribe), its place in the queue and its admission released, where
    it used to run to its end for nobody while the clients still there waited behind it or got 429s. The
    server stopping (`ending`) drops it too, with a 503 to the client, where uvicorn cut the connection.
    (A task asked to cancel is not cancelled() until it runs again: hence done() first.)"""
    run = asyncio.ensure_future(transcribing)
    gone = asyncio.ensure_future(_disconnected(request))
    stop = asyncio.ensure_future(ending.wait())
    try:
        await asyncio.wait({run, gone, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        stop.cancel()
        if not run.done():
            run.cancel()
    if run.done() and not run.cancelled():
        return run.result()
    if ending.is_set():
        raise shutting_down()
    raise ClientDisconnect()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read whole, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _failed(exc: TimeoutError | ValueError, speech: SpeechService) -> ApiError:
    """A transcription that did not finish, as the API's error."""
    if isinstance(exc, TimeoutError):
        return ApiError(
            504,
            f"the transcription did not finish within {speech.settings.timeout_s:g} s; retry with shorter audio",
            type="server_error",
            code="timeout",
        )
    if isinstance(exc, ParamError):  # an option this model cannot honour (translation on an English-only model)
        return ApiError(400, str(exc), exc.param, code="unsupported_option")
    # anything else is the transcriber's own failure, not the request's option (NaN samples were a 400
    # "unsupported_option" with numpy's words)
    return ApiError(500, f"the transcription failed ({exc}); retry it", type="server_error", code="transcription_error")


_STREAMED = (ResponseFormat.JSON, ResponseFormat.TEXT)


async def _stream(
    request: Request,
    speech: SpeechService,
    audio: DecodedAudio,
    options: dict[str, Any],
    started: float,
    decoded: float,
    ending: asyncio.Event,
    observe: Callable[[dict[str, Any]], None],
) -> Response:
    """OpenAI's streamed transcript: a `transcript.text.delta` event per segment as its window is decoded,
    then `transcript.text.done` with the whole text and the usage. The response starts with the first
    segment (or the end), so that a transcription failing before any text is an ordinary error response;
    one failing later ends the stream with an error event, as does the server stopping (`ending`). The
    response's end, however it comes (done, or the client gone), drops the job if it still runs and releases
    the admission (_SpeechStream)."""
    loop = asyncio.get_running_loop()
    segments: asyncio.Queue[Segment] = asyncio.Queue()

    def on_segment(segment: Segment) -> None:  # on a speech worker
        if not loop.is_closed():
            loop.call_soon_threadsafe(segments.put_nowait, segment)

    run = asyncio.ensure_future(speech.transcribe(audio.samples, on_segment=on_segment, **options))

    async def next_segment() -> Segment | None:
        """The next segment, or None once the run has ended and every segment it made was taken (its worker
        queues them before the run's result); shutting_down()'s ApiError once the server stops."""
        while segments.empty() and not run.done():
            get = asyncio.ensure_future(segments.get())
            stop = asyncio.ensure_future(ending.wait())
            try:
                await asyncio.wait({run, get, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                if not get.done():
                    get.cancel()
            if get.done() and not get.cancelled():
                return get.result()
            if ending.is_set():
                run.cancel()  # the job is dropped at its next window
                raise shutting_down()
        return segments.get_nowait() if not segments.empty() else None

    # the first segment, or the client gone first (a long run's first window can take seconds: left alone,
    # the run went on for nobody and held its admission until it ended)
    try:
        head = await _unless_gone(request, next_segment(), ending)
    except BaseException:
        run.cancel()  # the job is dropped at its next window
        raise
    if head is None and run.exception() is not None:  # failed before any text: an ordinary error response
        exc = run.exception()
        if isinstance(exc, (TimeoutError, ValueError)):
            raise _failed(exc, speech)
        raise exc

    async def events() -> AsyncIterator[bytes]:
        text, segment = "", head
        while segment is not None:
            delta = segment.text if text else segment.text.lstrip()
            text += delta
            yield _event({"type": "transcript.text.delta", "delta": delta})
            try:
                segment = await next_segment()
            except ApiError as exc:  # the server stops
                yield _event({"type": "error", "error": exc.body()["error"]})
                return
        try:
            result = run.result()
        except (TimeoutError, ValueError) as exc:
            yield _event({"type": "error", "error": _failed(exc, speech).body()["error"]})
            return
        usage = _usage(result, decoded - started, time.perf_counter() - started)
        observe(usage)
        yield _event({"type": "transcript.text.done", "text": result.transcript.text, "usage": usage})

    def close() -> None:
        run.cancel()  # a job still running is dropped (SpeechService.transcribe sets it abandoned)
        speech.release()

    return _SpeechStream(events(), close)


class _SpeechStream(StreamingResponse):
    """A streamed transcript that calls `close` once when the response ends, however it ends: a stream
    whose client left before its first byte never starts its body, so the body's own `finally` cannot be
    what releases the admission."""

    def __init__(self, events: AsyncIterator[bytes], close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()


def _event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def _usage(result: SpeechResult, audio_s: float, total_s: float) -> dict[str, Any]:
    """OpenAI's duration usage, plus seconds per stage like the chat API's Groq-style times."""
    t = result.transcript.timings
    return {
        "type": "duration",
        "seconds": round(result.transcript.duration, 3),
        "audio_decode_time": round(audio_s, 6),
        "queue_time": round(result.queue_s, 6),
        "features_time": round(t.features_ms / 1000, 6),
        "encode_time": round(t.encode_ms / 1000, 6),
        "decode_time": round(t.decode_ms / 1000, 6),
        "transcribe_time": round(result.run_s, 6),
        "total_time": round(total_s, 6),
    }


def _server_timing(usage: dict[str, Any]) -> str:
    """The same stages as an HTTP Server-Timing header (milliseconds): browsers' dev tools show it."""
    stages = ("audio_decode", "queue", "features", "encode", "decode", "total")
    return ", ".join(f"{s};dur={usage[s + '_time'] * 1000:.1f}" for s in stages)


def add_speech_routes(app: FastAPI, state: ServerState) -> None:
    @app.post(TRANSCRIPTIONS)
    async def transcriptions(request: Request) -> Response:
        return await answer(request, state, "transcribe")

    @app.post(TRANSLATIONS)
    async def translations(request: Request) -> Response:
        return await answer(request, state, "translate")

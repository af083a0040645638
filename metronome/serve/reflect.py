"""Reflection rounds over HTTP: `POST /v1/reflections` runs agents/reflect.py's loop on the server.

Why a route of its own, and not a loop a client drives through /v1/chat/completions: the loop builds
each turn's prompt from the previous prompt's token ids and the reply's ids as they were sampled, so the
prefix cache serves the whole transcript; a client sends text, which the server re-tokenizes (a reply may
split otherwise than it was sampled, and the cache misses from there on), and it waits a round trip and a
template render per turn. Events are typed SSE (as the Responses API's: `event:` name, and `type` in the
JSON) because a reflection is several turns, each with its own timings, which chat completion chunks have
no place for. docs/reflection.md describes the events.

The loop is blocking code (it waits on engine events), so each reflection runs on a thread of its own,
and its events reach the event loop through the app's Outbox; at most `max_pending` run at once (429
beyond). A client that goes away, streamed or not, stops its loop at its next event and cancels the running
turn. Each turn enters the engine's queue as any request does: a turn the full queue refuses ends the
reflection with a 429 queue_full (Retry-After), as a chat request would get, whether it is the first turn
or a later one.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.requests import ClientDisconnect

from metronome.agents.reflect import (
    MAX_ROUNDS,
    ReflectEvent,
    ReflectionDone,
    ReflectSettings,
    TurnDelta,
    TurnDone,
    TurnStarted,
    TurnStats,
    TurnWatch,
    check_fits,
    reflect,
)
from metronome.config import MIN_SAMPLING_FLOAT, ParamError, SamplingParams
from metronome.engine.request import QueueFullError
from metronome.serve.errors import ApiError, busy
from metronome.serve.jobs import client_gone
from metronome.serve.schemas import Int, _Body

if TYPE_CHECKING:
    from metronome.engine import Engine, Request
    from metronome.serve.prometheus import ApiRequest
    from metronome.serve.server import ServerState

REFLECTIONS = "/v1/reflections"
MAX_PENDING = 16  # reflections running at once (each holds one engine request at a time); then 429
EVENT_TIMEOUT_S = 600.0  # the longest the stream waits for the loop's next event before failing the request

_R, _S = ReflectSettings(), SamplingParams()


class ReflectionBody(_Body):
    """The loop's settings and the sampling of every turn; defaults are ReflectSettings' and SamplingParams'
    (greedy), as for `metronome reflect` and `run_reflection`."""

    model: str | None = None
    task: str = Field(min_length=1)
    rounds: Int = Field(_R.rounds, ge=1, le=MAX_ROUNDS)
    points: Int = _R.points
    critique: str = _R.critique
    revision: str = _R.revision
    system: str | None = None
    max_tokens: Int = Field(_S.max_tokens, ge=1)  # per turn
    temperature: float = Field(_S.temperature, ge=0.0, le=2.0)
    top_p: float = Field(_S.top_p, ge=MIN_SAMPLING_FLOAT, le=1.0)
    top_k: Int = Field(_S.top_k, ge=0)
    min_p: float = Field(_S.min_p, ge=0.0, le=1.0)
    repetition_penalty: float = Field(_S.repetition_penalty, ge=MIN_SAMPLING_FLOAT, le=10.0)
    seed: Int | None = None
    stream: bool = False

    def settings(self) -> tuple[ReflectSettings, SamplingParams]:
        """The records the loop takes; ParamError (-> 400 naming it) for a value they refuse."""
        return (
            ReflectSettings(self.rounds, self.points, self.critique, self.revision, self.system),
            SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                seed=self.seed,
            ),
        )


_FIELDS = frozenset(ReflectionBody.model_fields)


def event_body(event: ReflectEvent) -> dict[str, Any]:
    """An event as JSON, with its `type`: turn.started | turn.delta | turn.done | reflection.done."""
    if isinstance(event, TurnStarted):
        return {"type": "turn.started", **asdict(event)}
    if isinstance(event, TurnDelta):
        return {"type": "turn.delta", **asdict(event)}
    if isinstance(event, TurnDone):
        return {"type": "turn.done", "text": event.text, "stats": _turn(event.stats)}
    if isinstance(event, ReflectionDone):
        return {"type": "reflection.done", **_summary(event)}
    raise TypeError(f"not a reflection event: {event!r}")


def _turn(s: TurnStats) -> dict[str, Any]:
    rate = s.tokens_per_s
    return {**asdict(s), "tokens_per_s": None if rate != rate else rate}  # NaN is no JSON: null


def _summary(done: ReflectionDone) -> dict[str, Any]:
    t = done.totals
    return {
        "answer": done.answer,
        "turns": [{"text": text, "stats": _turn(s)} for s, text in zip(done.turns, done.texts)],
        "totals": {**asdict(t), "outside_ms": t.outside_ms, "outside_share": t.outside_share},
    }


class ReflectionRun:
    """One reflection on its own thread; events onto the loop's queue, then None (or the exception).
    Its turns' engine requests are counted in the server's metrics as a chat request's choices are.
    It is one of the server's running reflections (state.reflections) from construction until its thread
    ends: counted only until close(), a client that connected and left again and again got past
    MAX_PENDING while the threads it left, and their queued turns, piled up (271 threads)."""

    def __init__(self, state: "ServerState", engine: "Engine", task: str, settings, params) -> None:
        self.events: asyncio.Queue[ReflectEvent | BaseException | None] = asyncio.Queue()
        self.stopping = threading.Event()
        self._outbox, self._state = state.outbox(), state
        state.reflections.add(self)
        loop, metrics = self._outbox.loop, state.metrics

        def on_loop(call: Callable[[], None]) -> None:
            if not loop.is_closed():  # closed: the server stopped, and its metrics with it (a reflection ends later)
                loop.call_soon_threadsafe(call)

        def ended(r: "Request", reason: str, gaps: list[float]) -> None:
            on_loop(
                lambda: metrics.observe_request(
                    r.timings,
                    len(r.prompt_ids),
                    len(r.output_ids),
                    gaps,
                    reason,
                    predicted_ttft_ms=r.predicted_ttft_ms,
                    cached_tokens=r.cached_tokens,
                    promised_tps=r.promised_tps,
                )
            )

        def submitted(r: "Request") -> None:
            self._turn = r  # what close() cancels
            if self.stopping.is_set():  # closed while this turn was being submitted
                engine.cancel(r)
            on_loop(metrics.observe_submitted)

        # the metrics' in-flight counts belong to the loop's thread: the callbacks hop onto it
        watch = TurnWatch(submitted, ended)
        self._turn: "Request | None" = None
        self._engine, self._on_loop = engine, on_loop
        self._args = (engine, task, settings, params, watch)
        self.thread = threading.Thread(target=self._main, name="metronome-reflect", daemon=True)

    def _main(self) -> None:
        loop_events = reflect(*self._args)
        try:
            for event in loop_events:
                self._outbox.put(self.events, event)
                if self.stopping.is_set():
                    break
            self._outbox.put(self.events, None)
        except Exception as exc:  # reported to the client as the stream's last event (or a 500)
            self._outbox.put(self.events, exc)
        finally:
            loop_events.close()  # cancels a turn still running
            self._on_loop(lambda: self._state.reflections.discard(self))

    def halt(self, error: ApiError) -> None:
        """End the reflection with `error` (the server is stopping): its client reads it next, and the loop's
        thread stops at its next event, cancelling the turn it runs. Event loop only."""
        self.stopping.set()
        self.events.put_nowait(error)

    def close(self) -> None:
        """The client is done with it (answered, or gone): its turn is cancelled, and the thread stops at its
        next event (the turn's end); the run leaves the server's count when the thread ends."""
        self.stopping.set()
        turn = self._turn
        if turn is not None and turn.finish_reason is None:
            self._engine.cancel(turn)

    async def next(self) -> ReflectEvent | None:
        try:
            item = await asyncio.wait_for(self.events.get(), EVENT_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(504, f"no reflection event within {EVENT_TIMEOUT_S:.0f} s", type="server_error") from None
        if isinstance(item, ApiError):  # halt()
            raise item
        if isinstance(item, QueueFullError):  # a turn the engine's queue had no room for: the server is busy
            raise busy(f"a turn of the reflection found the queue full: {item}", self._state.settings.retry_after_s)
        if isinstance(item, BaseException):
            raise ApiError(500, f"the reflection failed: {item}", type="server_error", code="engine_error")
        return item

    async def next_unless_gone(self, gone: "asyncio.Future[None]") -> ReflectEvent | None:
        """next(), or ClientDisconnect once `gone` (the client left) is done first."""
        event = asyncio.ensure_future(self.next())
        try:
            await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not event.done():
                event.cancel()
        if not event.done() or event.cancelled():
            raise ClientDisconnect()
        return event.result()


def add_reflect_routes(app: FastAPI, state: "ServerState") -> None:
    @app.post(REFLECTIONS)
    async def reflections(request: Request) -> Response:
        from metronome.serve import server as chat  # imported here: server.py imports this module

        # counted as the chat routes count their requests: ended by what stops it before it runs (a 4xx is
        # "rejected"), else by how the loop ends (below, and in _stream)
        with chat._accounted(state.metrics, REFLECTIONS) as account:
            served = state.require()
            body = await chat._parse(request, state, ReflectionBody, _FIELDS)
            if body.model is not None and body.model not in (served.identity.id, state.settings.model_alias):
                raise ApiError(
                    404, f"the model {body.model!r} does not exist here", param="model", code="model_not_found"
                )
            try:
                settings, params = body.settings()
                await asyncio.to_thread(check_fits, served.engine, body.task, settings, params)
            except ParamError as exc:
                raise ApiError(400, str(exc), param=exc.param) from None
            state.refuse_if_stopping()
            if len(state.reflections) >= MAX_PENDING:
                raise busy(f"{MAX_PENDING} reflections are running; retry later", state.settings.retry_after_s)
            run = ReflectionRun(state, served.engine, body.task, settings, params)
            run.thread.start()
            if body.stream:
                return StreamingResponse(
                    _stream(run, account),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            # a client that leaves stops the loop (close() below) and the request counts as cancelled: it ran
            # every turn for nobody, holding a slot and one of the MAX_PENDING places
            gone = asyncio.ensure_future(client_gone(request.receive))
            try:
                while (event := await run.next_unless_gone(gone)) is not None:
                    if isinstance(event, ReflectionDone):
                        account.end("completed")
                        return JSONResponse({"object": "reflection", "model": served.identity.id, **_summary(event)})
                raise ApiError(500, "the reflection ended without its result", type="server_error")
            finally:
                gone.cancel()
                run.close()


async def _stream(run: ReflectionRun, account: "ApiRequest") -> AsyncIterator[str]:
    """SSE: `event: <type>` and `data: <json>` per event, then `data: [DONE]`. A client that leaves closes
    this generator: the loop stops at its next event (and the request counts as cancelled)."""
    try:
        while True:
            try:
                event = await run.next()
            except ApiError as exc:  # a 4xx (the queue was full) is the client's to retry, not a server failure
                account.end("rejected" if exc.status < 500 else "failed")
                yield f"event: error\ndata: {json.dumps({'type': 'error', **exc.body()})}\n\n"
                break
            if event is None:
                break
            if isinstance(event, ReflectionDone):
                account.end("completed")
            body = event_body(event)
            yield f"event: {body['type']}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        account.end("cancelled")  # a no-op once it ended above
        run.close()

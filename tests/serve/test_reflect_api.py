"""`POST /v1/reflections` through a real server on 127.0.0.1: typed SSE events per turn, the whole body,
the same turns as the Python API, and bad input answered 400 naming the parameter."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from helpers.live_server import LiveServer
from helpers.submits import recorded_submits

from metronome.agents.reflect import ReflectSettings, run_reflection
from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

TASK = "Name one planet and say why it is interesting."


@pytest.fixture(scope="module")
def served(smollm):
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=512), loaded=smollm)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(smollm))
    with LiveServer(app) as url:
        yield url, engine
    engine.stop()


def _events(url: str, body: dict) -> list[tuple[str, dict]]:
    out = []
    with httpx.stream("POST", f"{url}/v1/reflections", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line == "data: [DONE]":
                out.append(("[DONE]", {}))
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == name
                out.append((name, data))
    return out


def test_streamed_turns_match_the_python_api(served):
    url, engine = served
    events = _events(url, {"task": TASK, "rounds": 1, "max_tokens": 12})
    names = [n for n, _ in events]
    assert names[-2:] == ["reflection.done", "[DONE]"]
    starts = [d for n, d in events if n == "turn.started"]
    assert [(d["round"], d["kind"]) for d in starts] == [(1, "answer"), (1, "critique"), (1, "revision")]
    texts = {}
    for name, data in events[:-2]:
        assert name in ("turn.started", "turn.delta", "turn.done")
        if name == "turn.started":
            texts[data["turn"]] = ""
        elif name == "turn.delta":
            texts[data["turn"]] += data["text"]
        else:
            assert data["text"] == texts[data["stats"]["turn"]]
    summary = events[-2][1]
    expected = run_reflection(engine, TASK, ReflectSettings(rounds=1), SamplingParams(max_tokens=12))
    assert [t["text"] for t in summary["turns"]] == list(expected.texts) == [texts[i] for i in range(3)]
    assert summary["answer"] == expected.answer
    stats = [t["stats"] for t in summary["turns"]]
    assert [s["prompt_tokens"] for s in stats] == [s.prompt_tokens for s in expected.turns]
    assert all(s["cached_tokens"] > 0 for s in stats[1:]) and all(s["extends"] for s in stats)
    totals = summary["totals"]
    assert totals["decode_ms"] == pytest.approx(sum(s["decode_ms"] for s in stats))
    assert totals["completion_tokens"] == sum(s["completion_tokens"] for s in stats)


def test_whole_body(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/reflections", json={"task": TASK, "rounds": 1, "max_tokens": 6}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "reflection" and len(body["turns"]) == 3
    assert body["answer"] == body["turns"][-1]["text"]
    assert 0 < body["totals"]["outside_share"] < 1


@pytest.mark.parametrize(
    "body, param",
    [
        ({"task": TASK, "rounds": 0}, "rounds"),
        ({"task": TASK, "rounds": 2.5}, "rounds"),
        ({"task": TASK, "rounds": 3, "max_tokens": 100}, "rounds"),  # 7 turns x 100 tokens cannot fit 512
        # nor can 3 turns x 256 (the default): fewer rounds cannot help, so the error names max_tokens
        ({"task": TASK, "rounds": 1}, "max_tokens"),
        ({"task": TASK, "points": 0}, "points"),
        ({"task": TASK, "critique": "list {n} things"}, "critique"),
        ({"task": TASK, "max_tokens": 0}, "max_tokens"),
        ({"task": TASK, "temperature": "hot"}, "temperature"),
        ({"task": ""}, "task"),
        ({"task": "   ", "max_tokens": 8, "rounds": 1}, "task"),
        ({"rounds": 1}, "task"),
        ({"task": TASK, "model": "gpt-9"}, "model"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_parameter(served, body, param):
    url, _ = served
    r = httpx.post(f"{url}/v1/reflections", json=body, timeout=30)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param, r.text


def test_a_body_that_is_not_json_is_a_400(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/reflections", content=b"{rounds", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_a_client_that_leaves_stops_the_loop(served):
    url, engine = served
    with recorded_submits(engine) as submitted:
        body = {"task": TASK, "rounds": 1, "max_tokens": 120, "stream": True}
        with httpx.stream("POST", f"{url}/v1/reflections", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line == "event: turn.delta":
                    break  # leave during the first turn
        time.sleep(2.0)  # three whole turns of 120 tokens would still be running
        deadline = time.monotonic() + 20
        while not engine.scheduler.idle and time.monotonic() < deadline:
            time.sleep(0.05)
    assert engine.scheduler.idle
    assert len(submitted) == 1 and submitted[0].finish_reason == "cancelled"
    assert len(submitted[0].output_ids) < 120


def test_a_whole_reflection_whose_client_leaves_stops_the_loop(served):
    """Not streamed, a reflection whose client had gone ran every turn for nobody (holding a slot and one of
    the 16 reflection places) and was counted completed; it now stops as a streamed one does."""
    import socket

    url, engine = served
    cancelled = 'metronome_api_requests_ended_total{endpoint="/v1/reflections",outcome="cancelled"}'
    before = _metrics(url).get(cancelled, 0.0)
    with recorded_submits(engine) as submitted:
        body = json.dumps({"task": TASK, "rounds": 1, "max_tokens": 120}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = f"POST /v1/reflections HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 60
            while not (submitted and submitted[0].output_ids) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert submitted and submitted[0].finish_reason is None  # the first turn is generating: leave
        deadline = time.monotonic() + 20
        while not engine.scheduler.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # a loop still running would submit its next turn now
    assert engine.scheduler.idle
    assert len(submitted) == 1 and submitted[0].finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while _metrics(url).get(cancelled, 0.0) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metrics(url)[cancelled] == before + 1


def test_a_turn_the_full_queue_refuses_is_a_429_not_an_engine_error(served):
    """The engine's QueueFullError (every slot busy, the queue at its limit) reached the client as a 500
    engine_error and was counted a server failure; chat requests get a 429 queue_full at the same moment."""
    from metronome.engine.request import QueueFullError

    url, engine = served
    submit, calls = engine.submit, []

    def full_from(n: int):
        def refusing(*args, **kwargs):
            calls.append(1)
            if len(calls) >= n:
                raise QueueFullError("9 requests are in, the most 1 slot and a queue of 8 hold")
            return submit(*args, **kwargs)

        return refusing

    try:
        engine.submit = full_from(1)  # the first turn
        r = httpx.post(f"{url}/v1/reflections", json={"task": TASK, "rounds": 1, "max_tokens": 6}, timeout=120)
        assert r.status_code == 429 and r.headers["Retry-After"], r.text
        assert r.json()["error"]["code"] == "queue_full"
        calls.clear()
        engine.submit = full_from(2)  # the critique, after the answer streamed
        events = _events(url, {"task": TASK, "rounds": 1, "max_tokens": 6})
    finally:
        del engine.submit
    names = [n for n, _ in events]
    assert names[-2:] == ["error", "[DONE]"] and "turn.done" in names, names
    assert events[-2][1]["error"]["code"] == "queue_full"


def test_a_turn_that_ends_after_the_server_loop_closed_is_quiet():
    """A reflection's thread ending after the server stopped counted its turn on a closed event loop:
    'Exception in thread metronome-reflect ... RuntimeError: Event loop is closed' in the server's log."""
    import asyncio
    from types import SimpleNamespace

    from metronome.serve.jobs import Outbox
    from metronome.serve.reflect import ReflectionRun

    loop = asyncio.new_event_loop()

    def never(*_args, **_kwargs) -> None:
        raise AssertionError("the metrics were counted on a closed loop")

    metrics = SimpleNamespace(observe_submitted=never, observe_request=never)
    state = SimpleNamespace(outbox=lambda: Outbox(loop), reflections=set(), metrics=metrics)
    run = ReflectionRun(state, None, TASK, None, None)
    loop.close()
    watch = run._args[-1]
    request = SimpleNamespace(timings=None, prompt_ids=[1], output_ids=[], predicted_ttft_ms=None, cached_tokens=0)
    watch.submitted(request)
    watch.ended(request, "cancelled", [])


def test_a_turn_submitted_while_the_reflection_closes_is_cancelled():
    """close() cancels the turn it knows of. A turn whose submit was under way on the reflection's thread
    when the client left is not known to it yet, and would run to its end for nobody: its submit sees the
    close and cancels it. A turn submitted before the close is cancelled by close() itself, once."""
    import asyncio
    from types import SimpleNamespace

    from metronome.serve.jobs import Outbox
    from metronome.serve.reflect import ReflectionRun

    loop = asyncio.new_event_loop()
    try:
        cancelled: list[str] = []
        engine = SimpleNamespace(cancel=lambda r: cancelled.append(r.id))
        metrics = SimpleNamespace(observe_submitted=lambda *a: None, observe_request=lambda *a, **k: None)
        state = SimpleNamespace(outbox=lambda: Outbox(loop), reflections=set(), metrics=metrics)
        run = ReflectionRun(state, engine, TASK, None, None)
        watch = run._args[-1]
        first = SimpleNamespace(id="first", finish_reason=None)
        watch.submitted(first)  # the client still there: the turn runs
        assert cancelled == []
        run.close()  # the client leaves while that turn runs
        assert cancelled == ["first"]
        watch.submitted(SimpleNamespace(id="late", finish_reason=None))  # a submit already under way
        assert cancelled == ["first", "late"]
    finally:
        loop.close()


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def test_reflections_are_counted_in_the_metrics(served):
    """A reflection is a generation request in /metrics, and each of its turns an engine request, so the
    accounts add up as for the chat routes (they were absent: a server running reflections looked idle)."""
    url, _ = served
    api = 'metronome_api_requests_{}_total{{endpoint="/v1/reflections"{}}}'
    before = _metrics(url)
    _events(url, {"task": TASK, "rounds": 1, "max_tokens": 6})  # three turns, to the end
    r = httpx.post(f"{url}/v1/reflections", json={"task": TASK, "rounds": 1, "max_tokens": 6}, timeout=120)
    assert r.status_code == 200
    assert httpx.post(f"{url}/v1/reflections", json={"task": ""}, timeout=30).status_code == 400
    body = {"task": TASK, "rounds": 1, "max_tokens": 120, "stream": True}
    with httpx.stream("POST", f"{url}/v1/reflections", json=body, timeout=120) as s:
        for line in s.iter_lines():
            if line == "event: turn.delta":
                break  # leave during the first turn
    deadline = time.monotonic() + 20
    while True:
        after = _metrics(url)
        if after["metronome_engine_requests_in_flight"] == 0 and after["metronome_api_requests_in_flight"] == 0:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.05)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew(api.format("received", "")) == 4
    assert grew(api.format("ended", ',outcome="completed"')) == 2
    assert grew(api.format("ended", ',outcome="rejected"')) == 1
    assert grew(api.format("ended", ',outcome="cancelled"')) == 1
    assert grew("metronome_engine_requests_submitted_total") == 7  # 3 + 3 turns, and the one left
    finished = {k: grew(f'metronome_engine_requests_finished_total{{reason="{k}"}}') for k in ("stop", "length")}
    assert sum(finished.values()) == 6
    assert grew('metronome_engine_requests_finished_total{reason="cancelled"}') == 1
    assert grew("metronome_time_to_first_token_seconds_count") == 7


def test_a_body_over_the_limit_is_refused_as_it_arrives(served):
    """The route read the whole body before its size check (600 MB were buffered before the 413); it now
    stops at the limit as the other routes do, with their error code."""
    url, _ = served
    r = httpx.post(f"{url}/v1/reflections", content=b"x" * ((4 << 20) + 1), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_clients_that_leave_do_not_get_past_the_limit_while_their_loops_run(smollm, monkeypatch):
    """A streamed reflection whose client left was dropped from the running count at once, while its
    thread went on to its next event (and a queued turn longer): a client connecting and leaving 200 times
    never got a 429 (271 threads, 121 engine requests in). Now a run counts until its thread ends. Here the
    loop's next event is held until the test lets it go."""
    import threading

    from metronome.agents.reflect import TurnStarted
    from metronome.serve import reflect

    release, ended = threading.Event(), threading.Event()

    def held_loop(*_args, **_kwargs):
        try:
            yield TurnStarted(0, 0, "answer", 10)
            assert release.wait(timeout=60)
            yield TurnStarted(1, 1, "critique", 20)  # the next event: a run whose client left stops here
        finally:
            ended.set()

    monkeypatch.setattr(reflect, "MAX_PENDING", 1)
    monkeypatch.setattr(reflect, "reflect", held_loop)
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=512), loaded=smollm)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(smollm))
    body = {"task": TASK, "rounds": 1, "max_tokens": 8, "stream": True}
    try:
        with LiveServer(app) as url:
            with httpx.stream("POST", f"{url}/v1/reflections", json=body, timeout=60) as r:
                assert r.status_code == 200
                assert next(r.iter_lines()).startswith("event: turn.started")
            # its client is gone, its thread is not: the next one waits for a place
            second = httpx.post(f"{url}/v1/reflections", json={**body, "stream": False}, timeout=60)
            assert second.status_code == 429, second.text
            release.set()
            assert ended.wait(timeout=30)
            for _ in range(200):  # bounded: the thread's end reaches the event loop
                if not app.state.server.reflections:
                    break
                time.sleep(0.02)
            assert not app.state.server.reflections
    finally:
        release.set()
        engine.stop()


def test_a_streamed_reflection_the_full_queue_ends_is_counted_rejected(served):
    """A streamed reflection whose later turn the full queue refuses ends with a 429 error event: the client's
    to retry, so /metrics count it rejected, as a chat request refused for the same reason, not failed."""
    from metronome.engine.request import QueueFullError

    url, engine = served
    submit, calls = engine.submit, []

    def refusing_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise QueueFullError("9 requests are in, the most 1 slot and a queue of 8 hold")
        return submit(*args, **kwargs)

    ended = 'metronome_api_requests_ended_total{{endpoint="/v1/reflections",outcome="{}"}}'
    before = _metrics(url)
    try:
        engine.submit = refusing_the_second
        events = _events(url, {"task": TASK, "rounds": 1, "max_tokens": 6})
    finally:
        del engine.submit
    assert events[-2][1]["error"]["code"] == "queue_full"
    deadline = time.monotonic() + 10
    while (after := _metrics(url))["metronome_api_requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    grew = {o: after.get(ended.format(o), 0.0) - before.get(ended.format(o), 0.0) for o in ("rejected", "failed")}
    assert grew == {"rejected": 1, "failed": 0}


def test_a_turn_of_one_token_has_no_rate_and_the_body_stays_json(served):
    """A turn of one token has no decode rate (NaN in TurnStats): it is null in the JSON (NaN is no JSON, and
    the whole body could not be written)."""
    url, _ = served
    r = httpx.post(f"{url}/v1/reflections", json={"task": TASK, "rounds": 1, "max_tokens": 1}, timeout=120)
    assert r.status_code == 200, r.text
    stats = [t["stats"] for t in json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the body"))["turns"]]
    assert [s["completion_tokens"] for s in stats] == [1, 1, 1] and [s["tokens_per_s"] for s in stats] == [None] * 3

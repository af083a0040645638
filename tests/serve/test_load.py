"""The server under concurrent load, on a tiny random model: /metrics accounts for every request (received =
completed + cancelled + failed + rejected + in flight; engine submitted = finished + in flight), and an
engine step that raises fails only the requests in that step while the others and the next ones are served."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from helpers.gate import Gate
from helpers.live_server import LiveServer

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.serve.prometheus import GENERATION_ENDPOINTS, OUTCOMES
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

MSG = [{"role": "user", "content": "the cat and the dog"}]
SETTLE_S = 30.0


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    return load(tiny_hf("llama"))


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed by name and labels as exposed."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def api(m: dict[str, float], endpoint: str, outcome: str) -> float:
    return m[f'metronome_api_requests_ended_total{{endpoint="{endpoint}",outcome="{outcome}"}}']


def settled(url: str) -> dict[str, float]:
    """/metrics once nothing is in flight (cancelled requests end within a step of their client leaving)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        m = metrics(url)
        if m["metronome_api_requests_in_flight"] == 0 and m["metronome_engine_requests_in_flight"] == 0:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"requests still in flight {SETTLE_S} s after every client was done: {m}")
        time.sleep(0.05)


def assert_accounts_add_up(m: dict[str, float]) -> None:
    for endpoint in GENERATION_ENDPOINTS:
        received = m[f'metronome_api_requests_received_total{{endpoint="{endpoint}"}}']
        ended = sum(api(m, endpoint, o) for o in OUTCOMES)
        assert received == ended, f"{endpoint}: {received} received, {ended} ended"
    finished = sum(v for k, v in m.items() if k.startswith("metronome_engine_requests_finished_total{"))
    assert m["metronome_engine_requests_submitted_total"] == finished


def test_metrics_count_every_outcome(tiny):
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=64, spec_tokens=0), loaded=tiny)
    gate = Gate(engine)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(tiny))
    chat, text = GENERATION_ENDPOINTS[:2]
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0}
    try:
        with LiveServer(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            # cancelled: a stream whose client leaves while the engine is stalled (so it cannot finish first)
            with http.stream("POST", chat, json={**body, "max_tokens": 40, "ignore_eos": True, "stream": True}) as r:
                next(r.iter_lines())  # the role chunk: the request is submitted
            # its flag, not the scheduler: a cancel that lands before the engine thread first schedules the
            # request (a busy machine) retires it at once, gone from the queue before a poll could see it
            deadline = time.monotonic() + SETTLE_S
            while not gate.submitted[0].cancelled:
                assert time.monotonic() < deadline, "the server did not cancel the request of a client that left"
                time.sleep(0.01)
            gate.opened.set()
            # completed: whole and streamed, chat and text
            assert http.post(chat, json=body).status_code == 200
            assert http.post(chat, json={**body, "stream": True}).status_code == 200
            assert http.post(text, json={"prompt": "the cat", "max_tokens": 3, "n": 2}).status_code == 200
            # rejected: a bad body, an unknown model, a prompt longer than the context
            assert http.post(chat, json={"messages": "hi"}).status_code == 400
            assert http.post(text, json={"prompt": "the", "model": "nope"}).status_code == 404
            assert http.post(text, json={"prompt": "the " * 100}).status_code == 400
            # failed: the next decode step raises
            real = engine.plan.decode

            def failing(*args, **kwargs):
                engine.plan.decode = real
                raise RuntimeError("simulated kernel failure")

            engine.plan.decode = failing
            assert http.post(chat, json=body).status_code == 500
            m = settled(url)
    finally:
        gate.opened.set()
        engine.stop()
    assert_accounts_add_up(m)
    assert [api(m, chat, o) for o in OUTCOMES] == [2, 1, 1, 1]
    assert [api(m, text, o) for o in OUTCOMES] == [1, 0, 0, 2]
    assert m['metronome_engine_requests_finished_total{reason="cancelled"}'] == 1
    assert m["metronome_e2e_latency_seconds_count"] == 4  # 6 generations, less the cancelled and the failed
    assert m['metronome_engine_requests_finished_total{reason="error"}'] == 1
    assert m["metronome_engine_requests_submitted_total"] == 6  # 2 + 1 + 2 (n=2) + 1
    # the longest gap of every stream that produced two tokens or more
    assert m["metronome_request_max_inter_token_latency_seconds_count"] >= 3


def test_a_failing_step_under_load_fails_only_its_requests(tiny):
    """16 concurrent clients (streamed and whole) on 2 slots; the 4th decode step raises. The requests in
    that step get a 500 engine_error (or an error event, streamed), every other one completes, the next
    request works, and the metrics add up."""
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=64, spec_tokens=0), loaded=tiny)
    real = engine.plan.decode
    steps = [0]
    in_failed_step: list[int] = []

    def decode(slots, *args, **kwargs):
        steps[0] += 1
        if steps[0] == 4:
            in_failed_step.extend(set(slots))  # a slot's rows: its decode row, or a chunk of its prompt
            raise RuntimeError("simulated kernel failure")
        return real(slots, *args, **kwargs)

    engine.plan.decode = decode
    app = create_app(engine, ServerSettings(), ModelIdentity.of(tiny))

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {"messages": MSG, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": i % 2 == 1}
        if not body["stream"]:
            r = await http.post("/v1/chat/completions", json=body)
            if r.status_code == 500:
                assert r.json()["error"]["code"] == "engine_error", r.text
                return "failed"
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["finish_reason"]
        events = []
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        if "error" in events[-1]:
            assert events[-1]["error"]["code"] == "engine_error"
            return "failed"
        return events[-1]["choices"][0]["finish_reason"]

    async def run(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return list(await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(16))), timeout=120))

    try:
        with LiveServer(app) as url:
            outcomes = asyncio.run(run(url))
            after = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, "max_tokens": 3}, timeout=60)
            m = settled(url)
    finally:
        engine.stop()
    assert 1 <= outcomes.count("failed") == len(in_failed_step) <= 2, outcomes
    assert outcomes.count("length") == 16 - len(in_failed_step), outcomes
    assert after.status_code == 200
    assert_accounts_add_up(m)
    chat = GENERATION_ENDPOINTS[0]
    assert api(m, chat, "failed") == len(in_failed_step) and api(m, chat, "completed") == 17 - len(in_failed_step)


def test_the_lean_sse_client_reads_what_httpx_reads(tiny):
    """bench/sse.py (the load bench's client) against the real server: the same events as httpx reads,
    and a refused request raises with its status."""
    from metronome.bench.sse import SseError, post_events

    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=64, spec_tokens=0), loaded=tiny)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(tiny))
    body = {"messages": MSG, "max_tokens": 12, "ignore_eos": True, "stream": True, "temperature": 0}
    try:
        with LiveServer(app) as url:
            port = int(url.rsplit(":", 1)[1])

            async def lean(b: dict) -> list[dict]:
                return [json.loads(d) async for d in post_events("127.0.0.1", port, "/v1/chat/completions", b)]

            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            reference = [json.loads(d) for d in lines if d != "[DONE]"]
            got = asyncio.run(asyncio.wait_for(lean(body), 60))
            assert [c["choices"] for c in got] == [c["choices"] for c in reference]
            assert len(got) >= 12
            with pytest.raises(SseError, match="400"):
                asyncio.run(asyncio.wait_for(lean({**body, "max_tokens": -1}), 60))
    finally:
        engine.stop()


def test_metrics_expose_the_step_profile(tiny):
    """/metrics carries the engine's step profile: its counters grow by the steps a request took."""
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=64, spec_tokens=0), loaded=tiny)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(tiny))
    try:
        with LiveServer(app) as url:
            before = metrics(url)
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, "max_tokens": 10, "ignore_eos": True})
            assert r.status_code == 200
            after = metrics(url)
    finally:
        engine.stop()
    steps = after["metronome_engine_steps_total"] - before["metronome_engine_steps_total"]
    assert steps >= 10  # the prompt's step(s), then one per token after the first
    plan = 'metronome_engine_step_phase_seconds_total{phase="plan"}'
    assert after[plan] > before[plan]
    decode_rows = 'metronome_engine_step_rows_total{kind="decode"}'
    assert after[decode_rows] - before[decode_rows] == 9
    for role in ("engine", "kernel_pool", "main", "other"):
        assert f'metronome_thread_cpu_seconds_total{{thread="{role}"}}' in after

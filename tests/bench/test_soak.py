"""`metronome bench --soak`: a short soak on a tiny model passes (nothing lost or hung, memory flat, /metrics add
up), and the soak does fail a server that loses requests or miscounts them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Callable

import httpx
import pytest
from helpers.live_server import LiveServer

from metronome.bench.soak import Client, SoakConfig, Tally, account_checks, parse_duration, rss_of, soak
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

SHORT = dict(min_prompt_tokens=5, max_prompt_tokens=60, max_output_tokens=8, cancel_within_s=0.5, seed=1)


@pytest.fixture
def tiny_server(tiny_hf):
    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=128), loaded=loaded)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    try:
        with LiveServer(app) as url:
            yield url, engine
    finally:
        engine.stop()


def test_durations_parse():
    assert [parse_duration(t) for t in ("90", "45s", "10m", "1.5h")] == [90.0, 45.0, 600.0, 5400.0]
    for bad in ("", "10x", "-5s", "0"):
        with pytest.raises(ValueError, match="--soak"):
            parse_duration(bad)


def test_a_short_soak_passes(tiny_server):
    """30 s, 2 x slots users, streamed and whole, dropped streams and cancellations (the server runs in this
    process, so its memory is this process's)."""
    url, _ = tiny_server
    config = SoakConfig(duration_s=30, users=8, **SHORT)
    result = asyncio.run(soak(url, config, rss_of(os.getpid())))
    print(result.summary())
    assert result.passed, result.summary()
    t = result.tally
    assert t.outcomes["completed"] > 50 and t.kinds["disconnect"] > 0 and t.kinds["cancel"] > 0
    assert t.kinds["streamed"] and t.kinds["whole"] and t.kinds["chat"] and t.kinds["completions"]


def test_the_soak_fails_a_server_that_loses_requests(tiny_server):
    """A server that never tells some requests how they ended (their events are dropped): their clients
    time out ("hung") and /metrics keep them in flight, so the soak fails."""
    url, engine = tiny_server
    real_submit = engine.submit
    dropped = []

    def submit(prompt_ids, params, on_event=None, *args, **kwargs):
        if len(dropped) < 3:
            dropped.append(prompt_ids)
            return real_submit(prompt_ids, params, lambda _delta: None, *args, **kwargs)
        return real_submit(prompt_ids, params, on_event, *args, **kwargs)

    engine.submit = submit
    config = SoakConfig(duration_s=8, users=4, request_timeout_s=4, settle_s=2, **SHORT)
    result = asyncio.run(soak(url, config))
    assert len(dropped) == 3 and not result.passed
    assert result.tally.outcomes["hung"] + result.tally.outcomes["cancelled"] >= 3  # the cancel wait may come first
    assert any(not c.ok and "add up" in c.name for c in result.checks), result.summary()


def test_the_server_must_count_the_requests_the_clients_sent():
    """The accounts were checked only against each other: a server whose /metrics counted no request (or
    every one twice) passed. Now they must count what was sent, less at most what its clients cancelled."""
    tally = Tally()
    for outcome in ["completed"] * 10 + ["cancelled"] * 2:
        tally.add(outcome, "")
    tally.kinds["cancel"] = 2

    def metrics(received: int) -> dict[str, float]:
        ended = 'metronome_api_requests_ended_total{endpoint="/v1/completions",outcome="completed"}'
        return {
            'metronome_api_requests_received_total{endpoint="/v1/completions"}': received,
            ended: received,
            "metronome_api_requests_in_flight": 0,
        }

    def counted(received: int) -> bool:
        return next(c for c in account_checks({}, metrics(received), tally) if "sent" in c.name).ok

    assert [counted(n) for n in (0, 9, 10, 11, 12, 13, 24)] == [False, False, True, True, True, False, False]


def test_a_stream_event_that_is_not_an_object_is_a_lost_request():
    """`data: 5` raised a TypeError that ended the whole soak with a traceback and no verdict."""
    import httpx

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="data: 5\n\ndata: [DONE]\n\n", headers={"content-type": "text/event-stream"})

    async def talk() -> tuple[str, str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://x") as http:
            client = Client(http, "m", SoakConfig(duration_s=1, users=1), None)
            return await client._talk("/v1/completions", {"stream": True}, None)

    outcome, detail = asyncio.run(talk())
    assert outcome == "lost" and "not an object" in detail


def test_a_server_that_dies_mid_soak_gets_a_verdict(tiny_hf):
    """The soak's end read /metrics with raise_for_status: a server gone by then ended the bench with an
    httpx traceback, and no summary or verdict."""
    import threading

    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=128), loaded=loaded)
    server = LiveServer(create_app(engine, ServerSettings(), ModelIdentity.of(loaded)))
    try:
        with server as url:
            threading.Timer(2.0, lambda: setattr(server.server, "should_exit", True)).start()
            config = SoakConfig(duration_s=5, users=2, request_timeout_s=5, settle_s=1, **SHORT)
            result = asyncio.run(soak(url, config))
    finally:
        engine.stop()
    assert not result.passed
    failed = {c.name for c in result.checks if not c.ok}
    assert "serves after the soak" in failed and "/metrics add up" in failed, result.summary()


def test_the_soak_command_writes_its_summary_to_out(tiny_server, tmp_path):
    """--soak --url --out DIR was accepted and nothing was written there."""
    url, _ = tiny_server
    out = subprocess.run(
        [sys.executable, "-m", "metronome.bench", "--soak", "3s", "--url", url, "--users", "2"]
        + ["--output-tokens", "4", "--out", str(tmp_path / "o"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = (tmp_path / "o" / "soak-summary.txt").read_text()
    assert summary.rstrip().endswith("PASS") and "requests:" in summary


@pytest.mark.slow
def test_the_soak_command_on_the_default_model(tmp_path):
    """`metronome bench --soak 40s`: starts `metronome serve` (SmolLM2, its defaults), prints the summary,
    exits 0 on a pass."""
    out = subprocess.run(
        [sys.executable, "-m", "metronome.bench", "--soak", "40s", "--out", str(tmp_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "PASS" in out.stdout and "/metrics requests add up" in out.stdout


@pytest.mark.parametrize("users", [[], ["--users", "2"]])
def test_soak_on_an_unreachable_url_is_a_clean_error(tmp_path, users):
    """--soak --url at a port nothing listens on: exit 2 naming the URL, not an httpx traceback (with
    --users too, which skips asking the server for its slots)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed on leaving: nothing listens there
    out = subprocess.run(
        [sys.executable, "-m", "metronome.bench", "--soak", "5s", "--url", f"http://127.0.0.1:{port}"]
        + ["--out", str(tmp_path), "--no-progress", *users],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot reach" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_stops_the_server_the_bench_started(tiny_hf, tmp_path, sigint):
    """`timeout` (SIGTERM) on a bench that started its own server: SIGTERM's default ended the bench at once
    and left the server (in a session of its own) running, orphaned. Now it stops it, as Ctrl-C does. Also
    where the bench started with SIGINT ignored (a script's `bench ... &`, nohup): SIGTERM, handed to Ctrl-C's
    handler, did nothing there, and the SIGKILL that followed orphaned the server."""
    import re
    import signal
    import socket
    import time

    def ignore_sigint() -> None:  # in the child before it starts Python, as a non-interactive shell's `&` does
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    argv = [sys.executable, "-m", "metronome.bench", "--soak", "5m", "--model", str(tiny_hf("llama"))]
    from metronome.bench.peers import _metronome_command

    # rich wrapped the "starting:" line at the width (80 when piped), and CI's longer checkout path put "--port"
    # at the end of a line and its number on the next (CI failed on it). COLUMNS ending the line right after
    # "--port" wraps it so on any path: the console must not wrap.
    columns = len(f"starting: {' '.join(_metronome_command())} serve --host 127.0.0.1 --port")
    bench = subprocess.Popen(
        [*argv, "--out", str(tmp_path), "--no-progress"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": str(columns)},
        preexec_fn=ignore_sigint if sigint == "ignored" else None,
    )
    try:
        port = None
        deadline = time.monotonic() + 120
        for line in bench.stderr:  # "starting: ... --port N ..." then "soak: ..." once the server answers
            port = port or (int(m.group(1)) if (m := re.search(r"--port (\d+)", line)) else None)
            if line.startswith("soak:") or time.monotonic() > deadline:
                break
        assert port is not None
        time.sleep(1.0)  # a few requests in flight
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 130
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break  # nothing listens: the server is gone
        time.sleep(0.2)
    else:
        pytest.fail(f"the bench's server still listens on {port} after the bench ended")


def test_fuzz_without_schemathesis_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    """schemathesis is a test extra. Without it the fuzzer's own ModuleNotFoundError ("No module named
    'schemathesis'", in quotes) slipped past a check for the name without them: "0 cases ... FAIL", after
    a server had been started for it. It is now refused first, naming the pin to install."""
    import importlib.util

    from metronome.bench import cli as bench_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "schemathesis" else real(name, *a)
    )
    out = tmp_path / "fuzz-out"
    assert bench_cli.main(["--fuzz", "5", "--url", "http://127.0.0.1:9", "--out", str(out), "--no-progress"]) == 2
    said = capsys.readouterr()
    assert "pip install 'schemathesis==4.32.5'" in said.out + said.err, said
    assert not out.exists()  # refused before anything was made or started


def test_memory_is_judged_after_the_warm_up_against_its_tolerance():
    """The memory rule: the median of the last tenth of the samples after the warm-up against the median of
    the first tenth; 5 % is the limit, growth inside the warm-up does not count, and a run with fewer than 4
    samples after the warm-up cannot pass it."""
    from metronome.bench.soak import memory_check

    mib = 2**20

    def samples(at: Callable[[int], float]) -> list[tuple[float, int]]:
        return [(float(t), int(at(t) * mib)) for t in range(100)]  # one a second; the warm-up ends at 20 s

    assert memory_check(samples(lambda t: 100 if t < 20 else 200), 20.0, 0.05).ok  # doubled in the warm-up
    assert memory_check(samples(lambda t: 100 if t < 90 else 104), 20.0, 0.05).ok  # +4 %
    grown = memory_check(samples(lambda t: 100 if t < 90 else 108), 20.0, 0.05)  # +8 %
    assert not grown.ok and "+8.0%" in grown.text
    few = memory_check([(0.0, 100 * mib), (21.0, 100 * mib), (22.0, 100 * mib), (23.0, 100 * mib)], 20.0, 0.05)
    assert not few.ok and "only 3 memory samples" in few.text


def test_the_accounts_fail_while_requests_are_in_flight_or_uncounted():
    """Received = ended is not enough: a request still in flight (API or engine) fails its account; and a
    stream its client dropped was sent, so it must have been received (only a cancelled one may not be)."""
    tally = Tally()
    for outcome in ["completed"] * 10 + ["cancelled"] * 2:
        tally.add(outcome, "")
    tally.kinds["disconnect"] = 2  # both dropped mid-stream: the server read them

    def metrics(received: int, api_flying: int, engine_flying: int) -> dict[str, float]:
        ended = 'metronome_api_requests_ended_total{endpoint="/v1/chat/completions",outcome="completed"}'
        return {
            'metronome_api_requests_received_total{endpoint="/v1/chat/completions"}': received,
            ended: received,
            "metronome_api_requests_in_flight": api_flying,
            "metronome_engine_requests_submitted_total": received,
            'metronome_engine_requests_finished_total{reason="stop"}': received,
            "metronome_engine_requests_in_flight": engine_flying,
        }

    def verdicts(*args: int) -> list[bool]:
        return [c.ok for c in account_checks({}, metrics(*args), tally)]

    assert verdicts(12, 0, 0) == [True, True, True]
    assert verdicts(12, 1, 0) == [True, False, True]
    assert verdicts(12, 0, 1) == [True, True, False]
    assert verdicts(10, 0, 0)[0] is False  # two dropped streams the server never counted


def _talk_once(answer: Callable[[httpx.Request], httpx.Response], body: dict) -> tuple[str, str]:
    async def talk() -> tuple[str, str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://x") as http:
            client = Client(http, "m", SoakConfig(duration_s=1, users=1), None)
            return await client._talk("/v1/completions", body, None)

    return asyncio.run(talk())


def _sse(*events: str) -> Callable[[httpx.Request], httpx.Response]:
    text = "".join(f"data: {e}\n\n" for e in events)
    return lambda _request: httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


@pytest.mark.parametrize(
    "answer, body, outcome",
    [
        (_sse('{"choices": [{"text": "a", "finish_reason": "stop"}]}', "[DONE]"), {"stream": True}, "completed"),
        (_sse('{"choices": [{"text": "a", "finish_reason": null}]}', "[DONE]"), {"stream": True}, "lost"),
        (_sse('{"choices": [{"text": "a", "finish_reason": "stop"}]}'), {"stream": True}, "lost"),
        (
            lambda _r: httpx.Response(200, json={"choices": [{"finish_reason": "length"}]}),
            {"stream": False},
            "completed",
        ),
        (lambda _r: httpx.Response(200, json={"choices": [{"finish_reason": None}]}), {"stream": False}, "lost"),
        (
            lambda _r: httpx.Response(429, json={"error": {"message": "m", "type": "t", "param": None, "code": "c"}}),
            {"stream": False},
            "error",
        ),
        (lambda _r: httpx.Response(500, json={"error": {"message": "server fell over"}}), {"stream": False}, "lost"),
    ],
    ids=["streamed", "done-without-finish", "no-done", "whole", "whole-without-finish", "clean-error", "bad-error"],
)
def test_what_a_client_counts_as_completed_lost_or_a_clean_error(answer, body, outcome):
    """A request counts as completed only with a finish reason (and `[DONE]` when streamed); an error counts
    as clean only in OpenAI's error shape (message, type, param, code); anything else is lost."""
    assert _talk_once(answer, body)[0] == outcome


def test_a_soak_needs_a_user():
    with pytest.raises(ValueError, match="at least 1 user"):
        SoakConfig(duration_s=10, users=0)


def test_a_lost_request_fails_the_soak_and_the_warm_ups_growth_is_not_counted(tiny_server, monkeypatch):
    """One request the client saw lost fails the soak, whatever else went well; and memory is measured from
    the end of the warm-up (warmup_share of the duration, in seconds): growth before it does not count."""
    url, _ = tiny_server
    real_talk, lost = Client._talk, []

    async def talk(self, path, body, drop_after):
        if not lost:
            lost.append(path)
            return "lost", "a 200 without choices (made up by the test)"
        return await real_talk(self, path, body, drop_after)

    monkeypatch.setattr(Client, "_talk", talk)
    reads = []

    def rss() -> int:  # sampled once a second from the start: grows until the 2nd sample, flat after
        reads.append(1)
        return (100 if len(reads) <= 2 else 200) * 2**20

    config = SoakConfig(duration_s=8, users=2, warmup_share=0.25, **SHORT)  # the warm-up ends at 2 s
    result = asyncio.run(soak(url, config, rss))
    verdicts = {c.name: c.ok for c in result.checks}
    assert not result.passed and not verdicts["no request lost or hung"], result.summary()
    assert verdicts["server memory flat"], result.summary()
    assert result.tally.outcomes["lost"] == 1 and any("made up by the test" in p for p in result.tally.problems)


@pytest.mark.parametrize(
    "fields", [dict(min_prompt_tokens=20, max_prompt_tokens=10), dict(min_prompt_tokens=0), dict(max_output_tokens=0)]
)
def test_a_soak_needs_prompt_lengths_in_order_and_an_output_token(fields):
    with pytest.raises(ValueError, match="prompt lengths need 1 <= min <= max, and at least 1 output token"):
        SoakConfig(duration_s=10, users=1, **fields)


def test_the_tally_keeps_the_first_20_problems_and_counts_clean_errors_by_kind():
    tally = Tally()
    for i in range(25):
        tally.add("lost", f"request {i}")
    for detail in ("429 busy", "429 busy", "400 bad"):
        tally.add("error", detail)
    assert tally.problems == [f"lost: request {i}" for i in range(20)]
    assert tally.errors == {"429 busy": 2, "400 bad": 1} and tally.outcomes == {"lost": 25, "error": 3}


def test_a_clean_error_is_named_by_its_code_else_its_type():
    from metronome.bench.soak import clean_error

    def error(code):
        return httpx.Response(429, json={"error": {"message": "m", "type": "busy", "param": None, "code": code}})

    assert (clean_error(error("too_many")), clean_error(error(None))) == ("429 too_many", "429 busy")


ERROR = '{"error": {"message": "m", "type": "t", "param": null, "code": "c"}}'
OPEN = '{"choices": [{"text": "a", "finish_reason": null}]}'
DONE = '{"choices": [{"text": "a", "finish_reason": "stop"}]}'


@pytest.mark.parametrize(
    "events, drop_after, outcome, says",
    [
        ([OPEN, OPEN, DONE, "[DONE]"], 2, "cancelled", "dropped mid-stream"),  # dropped at its 2nd event
        ([OPEN, DONE, "[DONE]"], 2, "completed", ""),  # finished by then: not dropped
        ([DONE, '{"choices": [], "usage": {}}', "[DONE]"], None, "completed", ""),  # a usage event after the finish
        ([OPEN, ERROR], None, "error", "streamed 500 c"),
        (["{nope", "[DONE]"], None, "lost", "a malformed event"),
    ],
    ids=["dropped", "finished-before-the-drop", "usage-after-finish", "streamed-error", "malformed"],
)
def test_what_a_streaming_client_counts(events, drop_after, outcome, says):
    """A client drops its stream at its `drop_after`-th event unless the answer has finished; a finish reason
    stays seen through a later usage event; an error event in OpenAI's shape is a clean error; a malformed
    event is a lost request."""

    async def talk() -> tuple[str, str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(_sse(*events)), base_url="http://x") as http:
            client = Client(http, "m", SoakConfig(duration_s=1, users=1), None)
            return await client._talk("/v1/completions", {"stream": True}, drop_after)

    got, detail = asyncio.run(talk())
    assert got == outcome and says in detail


def test_a_refused_stream_is_a_clean_error_and_a_whole_answer_without_choices_is_lost():
    refusal = '{"error": {"message": "m", "type": "t", "param": null, "code": "busy"}}'

    def refuse(_request):
        return httpx.Response(429, text=refusal, headers={"content-type": "application/json"})

    assert _talk_once(refuse, {"stream": True}) == ("error", "429 busy")
    outcome, detail = _talk_once(lambda _r: httpx.Response(200, json={"choices": []}), {"stream": False})
    assert outcome == "lost" and "a 200 without choices" in detail


def test_the_engines_account_must_add_up_and_missing_gauges_fail():
    """The engine's submitted requests must all have finished (12 submitted, 11 finished fails); a /metrics
    without the in-flight gauges cannot say that nothing is in flight, so the accounts fail."""
    tally = Tally()
    for _ in range(12):
        tally.add("completed", "")
    received = 'metronome_api_requests_received_total{endpoint="/v1/completions"}'
    ended = 'metronome_api_requests_ended_total{endpoint="/v1/completions",outcome="completed"}'
    metrics = {
        received: 12,
        ended: 12,
        "metronome_api_requests_in_flight": 0,
        "metronome_engine_requests_submitted_total": 12,
        'metronome_engine_requests_finished_total{reason="stop"}': 11,
        'metronome_engine_requests_finished_total{reason="length"}': 0,
        "metronome_engine_requests_in_flight": 0,
    }
    checks = account_checks({}, metrics, tally)
    assert [c.ok for c in checks] == [True, True, False]
    assert checks[2].text == "submitted 12 = length 0 + stop 11 (+ 0 in flight)"
    metrics['metronome_engine_requests_finished_total{reason="stop"}'] = 12
    assert [c.ok for c in account_checks({}, metrics, tally)] == [True, True, True]
    del metrics["metronome_api_requests_in_flight"], metrics["metronome_engine_requests_in_flight"]
    assert [c.ok for c in account_checks({}, metrics, tally)] == [True, False, False]


def test_memory_at_the_edges_of_the_rule():
    """Growth of exactly the tolerance passes (100 to 125 MiB at 25 %, and 100 to 105 MiB at the soak's own
    5 %, where 105 / 100 - 1 comes out just over 0.05 in floating point: it failed, saying "+5.0%, limit
    +5%"); the sample taken at the warm-up's end counts as after it (4 samples from 20 s pass, 3 do not); a
    short run still takes the median of 2 samples at each end: 100, 100 then 100, 108 is +4 %, not the last
    sample's +8 %."""
    from metronome.bench.soak import memory_check

    mib = 2**20
    exact = [(float(t), (100 if t < 90 else 125) * mib) for t in range(20, 100)]
    assert memory_check(exact, 20.0, 0.25).ok
    assert memory_check([(float(t), (100 if t < 90 else 105) * mib) for t in range(20, 100)], 20.0, 0.05).ok
    assert not memory_check([(float(t), (100 if t < 90 else 106) * mib) for t in range(20, 100)], 20.0, 0.05).ok
    assert memory_check([(float(t), 100 * mib) for t in (19, 20, 21, 22, 23)], 20.0, 0.05).ok
    short = memory_check([(float(t), (108 if t == 24 else 100) * mib) for t in range(20, 25)], 20.0, 0.05)
    assert short.ok and "100.0 MiB after the warm-up (20 s), 104.0 MiB at the end (+4.0%" in short.text


def test_a_soak_needs_a_positive_duration():
    with pytest.raises(ValueError, match="a positive duration"):
        SoakConfig(duration_s=0, users=1)


def test_the_summary_gives_the_p99_latency_and_fails_with_any_check():
    """101 completed requests of 0.00 to 1.00 s: the median 0.50 s, the p99 the 100th of them (0.99 s, not the
    slowest); one failed check makes the verdict FAIL."""
    from metronome.bench.soak import Check, SoakResult

    tally = Tally()
    tally.latencies_s = [i / 100 for i in range(101)]
    checks = [Check("some requests completed", True, "101"), Check("serves after the soak", False, "HTTP 500")]
    text = SoakResult(SoakConfig(duration_s=10, users=1), "http://x", tally, checks, 10.0).summary()
    assert "completed requests: median 0.50 s, p99 0.99 s" in text
    assert "FAIL serves after the soak: HTTP 500" in text and text.splitlines()[-1] == "FAIL"


def test_the_metrics_are_read_once_nothing_is_in_flight_in_the_api_or_the_engine():
    """The checks compare counters once every request has ended: the API answered its last one while the
    engine still held one, so /metrics is read again (either gauge alone at 0 is not settled)."""
    from metronome.bench.soak import _settled

    pages = iter(
        [
            "metronome_api_requests_in_flight 0\nmetronome_engine_requests_in_flight 1\n",
            "metronome_api_requests_in_flight 1\nmetronome_engine_requests_in_flight 0\n",
            "metronome_api_requests_in_flight 0\nmetronome_engine_requests_in_flight 0\nmetronome_x 7\n",
        ]
    )

    async def read() -> dict[str, float]:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=next(pages)))
        async with httpx.AsyncClient(transport=transport, base_url="http://soak.test") as http:
            return await _settled(http, settle_s=30.0)

    assert asyncio.run(read())["metronome_x"] == 7


@pytest.mark.parametrize("page", ["metronome_slots 0\n", "other_gauge 8\n"])
def test_a_server_without_slots_in_its_metrics_is_refused_naming_the_fix(monkeypatch, page):
    from metronome.bench import soak as soak_module

    real = httpx.Client
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=page))
    monkeypatch.setattr(soak_module.httpx, "Client", lambda **kw: real(transport=transport, **kw))
    with pytest.raises(ValueError, match="no metronome_slots: not a metronome server\\? give --concurrency"):
        soak_module.server_slots("http://soak.test")
    monkeypatch.setattr(
        soak_module.httpx,
        "Client",
        lambda **kw: real(
            transport=httpx.MockTransport(lambda r: httpx.Response(200, text="metronome_slots 8\n")), **kw
        ),
    )
    assert soak_module.server_slots("http://soak.test") == 8

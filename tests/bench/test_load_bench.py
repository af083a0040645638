"""`metronome bench --load` end to end on a tiny model: the in-process and served levels side by side (a real
`metronome serve` child process and the bench's own SSE client), the server's step profile scraped from
/metrics, and the stall measurement's window (the streaming user's gaps while the long prompt runs)."""

from __future__ import annotations

import asyncio
import json
import math
import re

import pytest
from helpers.scripted_server import ScriptedServer, chunk, sse_head

from metronome.bench import load as bench_load
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load


def test_load_levels_in_process_and_served_side_by_side(tiny_hf, capsys):
    model = str(tiny_hf("llama"))
    assert bench_load.main(model, EngineConfig(slots=2, ctx=256), [1, 2], 12, served=True, stall=False, rounds=2) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| in process |", "| served |"))]
    assert [r.split("|")[1:3] for r in rows] == [
        [" in process ", " 1 "],
        [" in process ", " 2 "],
        [" served ", " 1 "],
        [" served ", " 2 "],
    ]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        aggregate, per_user, promise = (float(c) for c in cells[2:5])
        assert aggregate > 0 and per_user > 0 and promise > 0, row
    served_2 = [c.strip() for c in rows[3].split("|")[1:-1]]
    # TTFT predicted at submit: in process read from the requests, served from each answer's usage
    assert float(cells_of(rows[0])[8]) >= 0 and float(cells_of(rows[2])[8]) >= 0
    assert len(served_2[-1].split("(")[1].split(",")) == 2, "served ÷ in process: one ratio per round"
    # the server's own profile, scraped from /metrics around each served level: steps ran, 2 users x 12 tokens
    assert out.count("the server's step profile and CPU by thread") == 4
    steps = [int(line.split()[0]) for line in out.splitlines() if line.endswith(" steps")]
    assert len(steps) == 4 and all(s >= 12 for s in steps), steps


def cells_of(row: str) -> list[str]:
    return [c.strip() for c in row.split("|")[1:-1]]


def test_stall_measures_the_streams_gaps_while_the_long_prompt_runs(tiny_hf):
    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=512, prefill_chunk=4), loaded=loaded)
    engine.start()
    try:
        stall = bench_load.measure_stall(engine, long_tokens=120, output_tokens=380, repeats=2)
    finally:
        engine.stop()
    assert stall["long_prompt_tokens"] == 120  # (a tiny model's stream of 380 tokens outlasts the prompt)
    # the window holds gaps: the long prompt ran in chunks beside the stream, whose tokens kept coming
    assert stall["stream_max_gap_during_prompt_ms"] > 0
    assert stall["stream_max_gap_during_prompt_ms"] >= stall["stream_median_gap_ms"] * 0.5
    assert len(stall["stream_max_gap_per_repeat_ms"]) == len(stall["ttft_beside_over_alone_per_repeat"]) == 2
    for key in ("long_ttft_alone_ms", "long_ttft_beside_stream_ms", "stream_median_gap_ms", "step_ms_all_slots"):
        assert math.isfinite(stall[key]) and stall[key] > 0, key


def test_each_round_and_level_opens_its_prompts_differently():
    """Every level and round sent the same texts, so from round 2 (and the first user of each larger level)
    the TTFT timed a prefix-cache copy of the prompt, and fell as users were added."""
    from os.path import commonprefix

    from metronome.bench.load import _texts

    rounds = [_texts(4, f"r{r}.u4.") for r in (1, 2)] + [_texts(2, "r1.u2.")]
    firsts = [texts[0] for texts in rounds]
    assert len({t for texts in rounds for t in texts}) == 10
    # they part within a few tokens of the user text, so they share no more than the chat template
    assert all(len(commonprefix([a, b])) < 8 for a in firsts for b in firsts if a is not b)


@pytest.mark.parametrize(
    "levels, output_tokens, says",
    [([1, 3], 8, "--load 3: more users than the engine's 2 slots"), ([1], 1, "--output-tokens 1")],
)
def test_levels_that_cannot_run_are_refused_before_the_model_loads(levels, output_tokens, says):
    """A level past --slots crashed in the plan (slots[2] out of range) after the model loaded, and one
    token a user failed after the level ran ("no median for empty data")."""
    with pytest.raises(ValueError, match=re.escape(says)):
        bench_load.main("/no/such/model.gguf", EngineConfig(slots=2), levels, output_tokens, served=False, stall=False)


def test_a_load_refusal_is_said_as_the_benchs_own(capsys):
    """It reached the top level's "metronome: error:" where every other mode says "metronome bench: error:"."""
    from metronome.bench import cli

    assert cli.main(["--load", "1,3", "--slots", "2", "--model", "/no/such/model.gguf"]) == 2
    assert "metronome bench: error: --load 3: more users" in " ".join(capsys.readouterr().err.split())


# --- the load bench's lean SSE client (bench/sse.py) against scripted servers --------------------------------


def _events(port: int, timeout_s: float = 10.0) -> list[bytes]:
    from metronome.bench.sse import post_events

    async def go() -> list[bytes]:
        return [d async for d in post_events("127.0.0.1", port, "/v1/chat/completions", {"stream": True})]

    return asyncio.run(asyncio.wait_for(go(), timeout_s))


def test_sse_events_are_read_whatever_the_framing() -> None:
    """Events come out whole however the body is cut: an event split across two chunks, a chunk holding two
    events, a chunk extension, `data:` without its space, a comment line, a close-delimited body; the request
    is a JSON POST to the path given; [DONE] ends the stream and is not yielded."""
    one, two, three = b'data: {"n": 1}\n\n', b'data:{"n": 2}\n\n', b': keep-alive\ndata: {"n": 3}\n\n'
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"  # header names and values in any case
    chunked = [head, chunk(one[:9]), 0.05, chunk(one[9:] + two), b"5;ext=1\r\n" + three[:5] + b"\r\n"]
    chunked += [chunk(three[5:]), chunk(b"data: [DONE]\n\n"), chunk(b'data: {"n": 4}\n\n'), b"0\r\n\r\n"]
    plain = [sse_head(chunked=False), one[:9], 0.05, one[9:] + two + three, b"data: [DONE]\n\n"]
    for parts in (chunked, plain):
        with ScriptedServer(parts) as server:
            assert _events(server.port) == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
        head_sent, _, body = server.requests[0].partition(b"\r\n\r\n")
        assert head_sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and json.loads(body) == {"stream": True}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("parts", "says"),
    [
        ([b"HTTP/1.1 429 Too Many\r\nContent-Length: 9\r\n\r\nslow down"], "429 Too Many: slow down"),
        ([sse_head(), chunk(b'data: {"n": 1}\n\n'), b"0\r\n\r\n"], "ended before its final 'data: [DONE]'"),
        ([sse_head(chunked=False), b'data: {"n": 1}\n\n'], "ended before its final 'data: [DONE]'"),
        ([sse_head(), b"40\r\ndata: {"], "malformed response body"),  # a chunk cut off by the close
        ([sse_head(), b"zz\r\n"], "malformed response body"),  # not a chunk size
        ([b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"], "ended before"),  # closed inside the headers
    ],
)
def test_sse_answers_that_are_not_a_whole_stream_raise(parts, says) -> None:
    """A refusal raises with its status line and body; a stream that ends without [DONE], a cut-off chunk, a
    broken chunk size and a close inside the headers raise SseError too (not a bare IncompleteReadError, not a
    success, not a loop that never ends)."""
    from metronome.bench.sse import SseError

    with ScriptedServer(parts) as server:
        with pytest.raises(SseError, match=re.escape(says)):
            _events(server.port)


class _Clock:
    """time.perf_counter's stand-in: each call moves on by one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_the_served_profile_takes_the_levels_own_counts_in_its_units():
    """The scrape before the level is subtracted: 100 steps and 0.5 s in the plan phase are 5.000 ms a step;
    the engine thread's 1.0 s over 200 tokens is 5000.0 µs a token and 0.50 cores over 2 s; the client's
    0.5 s is 2500.0 µs and 0.25 cores."""
    before = {
        ("metronome_engine_steps", ""): 10.0,
        ("metronome_engine_step_phase_seconds", "plan"): 1.0,
        ("metronome_thread_cpu_seconds", "engine"): 2.0,
    }
    after = {
        ("metronome_engine_steps", ""): 110.0,
        ("metronome_engine_step_phase_seconds", "plan"): 1.5,
        ("metronome_thread_cpu_seconds", "engine"): 3.0,
    }
    text = bench_load.served_profile(before, after, client_cpu_s=0.5, wall_s=2.0, tokens=200)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "plan 5.000" in lines and "100 steps" in lines
    assert "engine 5000.0 µs 0.50 cores" in lines and "client (this process) 2500.0 µs 0.25 cores" in lines


def test_a_level_is_held_to_its_mean_decode_position():
    """Prompts of 10 and 20 tokens decoding 8 tokens each: rows sit at 10 + 4 and 20 + 4 on average, 19."""
    assert bench_load._mean_position([[0] * 10, [0] * 20], 8) == 19


def test_the_step_timed_now_stays_inside_the_context(monkeypatch):
    """A mean position past the plan's context is timed at its last position (63 of 64), on slots 0..live-1."""
    from types import SimpleNamespace

    calls = []
    plan = SimpleNamespace(device="cpu", decode=lambda *args: calls.append(args))
    engine = SimpleNamespace(config=SimpleNamespace(ctx=64), plan=plan)
    monkeypatch.setattr(bench_load, "time_warm", lambda fn, device, calls: [fn(), 3.0, 1.0, 2.0][1:])
    assert bench_load.step_ms_now(engine, 2, 100) == 2.0
    assert calls == [([0, 1], [1, 1], [63, 63])]


def test_an_in_process_level_reads_its_figures_from_the_stamps(monkeypatch):
    """A stand-in engine that streams each of 2 users 3 one-token events, the clock a second a read: the
    level starts at 1, user 0's tokens come at 2, 3, 4 and user 1's at 5, 6, 7, the level ends at 8. Per
    user: 2 tokens after the first in 2 s, 1.0 tokens/s; in all 6 tokens in 7 s; TTFT 0.25 s is 250 ms.
    The promise is 1000 / the 2-row step timed at the mean position (10 + 3/2, rounded to 12): 100 at
    10 ms; the calibration is asked for 2 live slots."""
    from types import SimpleNamespace

    asked = []

    class Engine_:
        thread_id = 0
        profile = SimpleNamespace(reset=lambda: None, snapshot=lambda: SimpleNamespace(table=lambda: "PROFILE"))
        plan = SimpleNamespace(report=SimpleNamespace(tokens_per_s=lambda live, pos: asked.append((live, pos)) or 7.0))
        pace = SimpleNamespace(factor=1.25, steps=32)

        def encode_prompt(self, text):
            prompt = [0] * 10
            self.first = getattr(self, "first", prompt)
            return prompt

        def submit(self, prompt, params, deliver):
            for i in range(params.max_tokens):
                deliver(SimpleNamespace(choices=[0], finish_reason="length" if i == params.max_tokens - 1 else None))
            promised = 40.0 if prompt is self.first else float("nan")  # the second user was promised no speed
            return SimpleNamespace(
                timings=SimpleNamespace(submitted=0.0, first_token=0.25), predicted_ttft_ms=30.0, promised_tps=promised
            )

    steps = []
    monkeypatch.setattr(bench_load, "_WAIT_S", 5.0)
    monkeypatch.setattr(bench_load.time, "perf_counter", _Clock())
    monkeypatch.setattr(bench_load, "cpu_seconds_by_thread", lambda thread_id: {})
    monkeypatch.setattr(bench_load, "step_ms_now", lambda engine, live, pos: steps.append((live, pos)) or 10.0)
    level, profile = bench_load.run_in_process(Engine_(), users=2, output_tokens=3)
    assert steps == [(2, 12)] and asked == [(2, 12)] and profile.startswith("PROFILE")
    assert profile.endswith("the engine's pace (its promises over the plan's prices): 1.25 (32 steps)")
    assert (level.users, level.per_user_tps, level.aggregate_tps) == (2, 1.0, pytest.approx(6 / 7))
    assert (level.predicted_tps, level.compiled_tps, level.ttft_ms, level.predicted_ttft_ms) == (
        100.0,
        7.0,
        250.0,
        30.0,
    )
    assert level.promised_tps == 40.0  # the median of the promises made: a NaN is none


def test_a_served_level_reads_its_figures_from_the_streams(monkeypatch):
    """A served user's rate is its completion tokens after the first over its first-to-last text event:
    5 tokens over 2 s is 2.0, 9 over 4 s is 2.0; TTFT the median of the users' (40 and 60 ms: 50). A
    stream's TTFT is from its request to its first text event: 1 s after on the stepping clock, 1000 ms."""
    real_level = bench_load._served_level

    async def fake_level(url, prompts, output_tokens):
        return [
            bench_load.ServedStream([1.0, 2.0, 3.0], 5, 40.0, promised_tps=1.5),
            bench_load.ServedStream([0.0, 4.0], 9, 60.0, promised_tps=2.5),
        ]

    monkeypatch.setattr(bench_load, "_scrape", lambda url: {})
    monkeypatch.setattr(bench_load, "_served_level", fake_level)
    level, _ = bench_load.run_served("http://127.0.0.1:9", 2, 8, predicted_tps=3.0, compiled_tps=4.0)
    assert (level.per_user_tps, level.ttft_ms, level.predicted_tps, level.compiled_tps) == (2.0, 50.0, 3.0, 4.0)
    assert level.promised_tps == 2.0

    async def events(host, port, path, body):
        for text in ("a", "b", "c"):
            yield json.dumps({"choices": [{"delta": {"content": text}}]})
        usage = {
            "completion_tokens": 3,
            "predicted_time_to_first_token": 0.25,
            "predicted_output_tokens_per_second": 80.5,
        }
        yield json.dumps({"choices": [], "usage": usage})

    monkeypatch.setattr(bench_load, "post_events", events)
    monkeypatch.setattr(bench_load.time, "perf_counter", _Clock())
    ((stamps, tokens, ttft, promised, speed),) = asyncio.run(real_level("http://127.0.0.1:9", ["hi"], 3))
    assert (stamps, tokens, ttft, promised, speed) == ([2.0, 3.0, 4.0], 3, 1000.0, 250.0, 80.5)


class _StallEngine:
    """A stand-in engine for `measure_stall` on a clock it moves itself: the streaming user's events come one
    per poll of the bench's wait (time.sleep) until 20 tokens have arrived, the rest while the long prompt
    runs (inside `generate`); `repeats` scripts, each (alone TTFT s, events before, long prompt's submitted
    and first-token times, events during), an event (time, tokens)."""

    def __init__(self, scripts, finishes: bool = True) -> None:
        from types import SimpleNamespace

        self.now, self.scripts, self.finishes = 0.0, list(scripts), finishes
        self.fillers: list[list[int]] = []
        self.steps: list[tuple] = []
        self.priced: list[tuple] = []
        self.pending: list[tuple[float, int]] = []
        self.deliver = None
        self.tokenizer = SimpleNamespace(encode=lambda text: list(range(len(text.split()))))
        self.config = SimpleNamespace(slots=4, prefill_chunk=16)
        report = SimpleNamespace(step_ms={1: 2.0, 4: 6.0}, prefill_steps_ms=self._price)
        self.plan = SimpleNamespace(cfg=SimpleNamespace(vocab_size=1000), report=report)
        self.calls = 0

    def _price(self, *args):
        self.priced.append(args)
        return [3.0, 7.0, 5.0]

    def encode_prompt(self, text: str) -> list[int]:
        return [0] * 12

    def sleep(self, _seconds: float) -> None:
        if self.pending:
            self.now, tokens = self.pending.pop(0)
            self.deliver(self._event(tokens, last=False))
        else:
            self.now += 1.0

    @staticmethod
    def _event(tokens: int, last: bool):
        from types import SimpleNamespace

        return SimpleNamespace(choices=[None] * tokens, finish_reason="length" if last else None)

    def submit(self, prompt, params, deliver) -> None:
        self.deliver = deliver
        self.pending = list(self.scripts[0][1])

    def generate(self, prompt, params, chat):
        from types import SimpleNamespace

        self.fillers.append(list(prompt))
        self.calls += 1
        if self.calls == 1:  # the warm-up
            return SimpleNamespace(timings=SimpleNamespace(submitted=0.0, first_token=0.5))
        if self.calls % 2 == 0:  # alone
            return SimpleNamespace(timings=SimpleNamespace(submitted=0.0, first_token=self.scripts[0][0]))
        alone_s, _, (submitted, first_token), during = self.scripts.pop(0)
        for k, (t, tokens) in enumerate(during):
            self.now = t
            self.deliver(self._event(tokens, last=self.finishes and k == len(during) - 1))
        return SimpleNamespace(timings=SimpleNamespace(submitted=submitted, first_token=first_token))


def _stall_scripts():
    ten_ms = [(2.0 + 0.01 * i, 3) for i in range(7)]  # 21 tokens in events of 3, 10 ms apart
    return [
        # 20 one-token events (a 500 ms gap, then 20 ms gaps); the prompt arrives after the last, at 0.86; its
        # first token at 1.32: gaps inside the window are 400 (arrival to the next event), 50 and 130 ms
        (0.2, [(0.0, 1), (0.5, 1)] + [(0.52 + 0.02 * i, 1) for i in range(18)],
         (0.87, 1.32), [(1.26, 2), (1.31, 1), (1.44, 1), (2.04, 1)]),
        # from 2.06: 190, 50 and 300 ms (the gap across the prompt's first token), then 1000 ms after it
        (0.1, ten_ms, (2.2, 2.35), [(2.25, 1), (2.3, 1), (2.6, 1), (3.6, 1)]),
        (0.6, [(t + 2.0, n) for t, n in ten_ms], (4.2, 4.35), [(4.25, 1), (4.3, 1), (4.6, 1), (5.6, 1)]),
    ]  # fmt: skip


def _stall(monkeypatch, engine):
    from types import SimpleNamespace

    monkeypatch.setattr(bench_load, "time", SimpleNamespace(perf_counter=lambda: engine.now, sleep=engine.sleep))
    monkeypatch.setattr(
        bench_load, "step_ms_now", lambda e, live, position: engine.steps.append((live, position)) or 8.0
    )
    return bench_load.measure_stall(engine, long_tokens=40, output_tokens=40, repeats=3)


def test_the_stall_figures_come_from_the_streams_gaps_inside_the_prompts_window(monkeypatch):
    """Three pairs on a scripted engine. The worst gap of each repeat is the longest between the prompt's
    arrival and its first token, counting the gap that straddles either edge and none wholly outside: 400,
    300, 300 ms (the 500 ms gap before and the 600 and 1000 ms gaps after do not count); the stream's median gap
    is between events (the 3 tokens of one event share a stamp): 20, 10, 10 ms, median 10. The long prompt's
    TTFT: 200, 100, 600 ms alone (median 200), 450, 150, 150 beside (median 150); ratios 2.25, 1.5, 0.25 (median
    1.5). The step is timed at all 4 slots at the stream's mid position (12 + 40 / 2); the plan prices the
    40-token prompt beside 1 row at 12 + 40 / 4, its worst of 3 steps 7 ms; the calibration is its 4-slot step."""
    from metronome.compile.fused import PREFILL_CHUNK

    engine = _StallEngine(_stall_scripts())
    got = _stall(monkeypatch, engine)
    approx = pytest.approx
    assert got["stream_max_gap_per_repeat_ms"] == [400.0, 300.0, 300.0]
    assert got["stream_max_gap_during_prompt_ms"] == approx(400.0)
    assert got["stream_median_gap_ms"] == approx(10.0)
    assert (got["long_ttft_alone_ms"], got["long_ttft_beside_stream_ms"]) == (approx(200.0), approx(150.0))
    assert got["ttft_beside_over_alone_per_repeat"] == [2.25, 1.5, 0.25]
    assert got["ttft_beside_over_alone"] == approx(1.5)
    assert engine.steps == [(4, 32)] and got["step_ms_all_slots"] == 8.0
    assert engine.priced == [([(0, 40)], 1, 16, PREFILL_CHUNK, 22)]
    assert (got["predicted_max_gap_ms"], got["predicted_prompt_steps"], got["step_ms_all_slots_calibrated"]) == (
        7.0,
        3,
        6.0,
    )
    # the warm-up, 3 alone and 3 beside: each its own 40-token prompt, none another's prefix
    assert len(engine.fillers) == 7 and all(len(f) == 40 for f in engine.fillers)
    assert len({f[1] for f in engine.fillers}) == 7


def test_a_stream_that_never_finishes_is_a_timeout_not_figures(monkeypatch):
    engine = _StallEngine(_stall_scripts(), finishes=False)
    monkeypatch.setattr(bench_load, "_WAIT_S", 0.05)
    with pytest.raises(TimeoutError, match="the streaming user did not finish"):
        _stall(monkeypatch, engine)


def test_zero_rounds_are_refused_before_the_model_loads():
    with pytest.raises(ValueError, match="--rounds must be at least 1, got 0"):
        bench_load.main("/no/such/model.gguf", EngineConfig(slots=2), [1], 8, served=False, stall=False, rounds=0)


def test_a_server_that_exits_is_said_with_its_own_words(monkeypatch):
    """The child's stderr is read back (the wait is cut to 60 s, which a bench that kept polling a dead server
    would run out instead of saying why)."""
    monkeypatch.setattr(bench_load, "_WAIT_S", 60.0)
    with pytest.raises(RuntimeError, match=r"the server exited: (?s:.*)no/such/model"):
        bench_load.start_server("/no/such/model.gguf", ["--slots=1"])


def test_a_server_that_never_becomes_healthy_is_killed_and_a_timeout(monkeypatch):
    """The child is `metronome serve` on the chosen port with no speech model, the model and the bench's own
    flags; polled on a port where nothing listens, the wait (cut to 1 s) ends in a kill and TimeoutError."""
    started = []

    class Proc:
        stderr = None
        killed = False

        def __init__(self, cmd, **kwargs):
            started.append(cmd)

        def poll(self):
            return None

        def kill(self):
            Proc.killed = True

        def wait(self, timeout=None):
            assert Proc.killed and timeout is not None  # reaped after the kill, within a bound
            return -9

    monkeypatch.setattr(bench_load, "_WAIT_S", 1.0)
    monkeypatch.setattr(bench_load.subprocess, "Popen", Proc)
    with pytest.raises(TimeoutError, match="did not become ready"):
        bench_load.start_server("model.gguf", ["--slots=2"])
    ((python, *cmd),) = started
    port = cmd[cmd.index("--port") + 1]
    assert cmd[:2] == ["-m", "metronome.serve.cli"] and int(port) > 0
    assert " ".join(cmd).endswith(f"--port {port} --speech-model none --slots=2 --model model.gguf")
    assert Proc.killed

"""Tests of `metronome bench` against a stub server with a known TTFT and rate, and of the HF peer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import jsonschema
import pytest
from helpers.scripted_server import HOLD, ScriptedServer, chunk, sse_head
from helpers.sweeps import sweep_config

from metronome.bench import cli, peers
from metronome.bench.client import Api, RequestSpec, discover_model, normalize_base_url, stream_request
from metronome.bench.metrics import (
    RequestResult,
    StreamTrace,
    derive_result,
    describe,
    first_sentence_chunk,
    token_chunk,
)
from metronome.bench.report import Environment, build_report, load_schema, report_json, write_report
from metronome.bench.runner import SweepConfig, SweepOutcome, Target, run_sweep
from metronome.bench.workloads import (
    CharEstimate,
    PromptBuilder,
    TokenizerFileCounter,
    load_corpus,
    resolve_workload,
    split_sentences,
)

STUB = Path(__file__).parents[1] / "helpers" / "bench_stub.py"


@contextlib.contextmanager
def stub_server(*options: str) -> Iterator[str]:
    """The stub in its own process (so its timing is not disturbed by the client); yields its URL."""
    process = subprocess.Popen(
        [sys.executable, str(STUB), *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("PORT "), f"stub did not start: {line!r} {process.stderr.read()}"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        process.terminate()
        process.wait(timeout=10)


class Recorder:
    """A SweepObserver that records calls and can raise KeyboardInterrupt after n requests."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.started: list[tuple[str, int, int]] = []
        self.done: list[RequestResult] = []
        self.interrupt_after = interrupt_after

    def measurement_started(self, target: Target, concurrency: int, round_index: int) -> None:
        self.started.append((target.name, concurrency, round_index))

    def request_done(self, target: Target, result: RequestResult) -> None:
        self.done.append(result)
        if self.interrupt_after is not None and len(self.done) >= self.interrupt_after:
            time.sleep(0.3)  # the interrupt comes a while after the last request finished, as a person's does
            raise KeyboardInterrupt


def builder() -> PromptBuilder:
    return PromptBuilder(load_corpus(), seed=0, counter=CharEstimate())


def report_of(outcome: SweepOutcome, config: SweepConfig, targets: list[Target]):
    return build_report(outcome, config, targets, Environment.here(None), "estimate", time.time(), time.time())


def close_to(value: float | None, expected: float, tolerance: float = 0.05) -> bool:
    return value is not None and abs(value - expected) <= tolerance * expected


# How late the stub's first token may reach the harness. After half a second of waiting, the stub's first send
# and the client's first read run through pages neither process touched since, and on the Intel Xeon VM such
# first work after a pause came 25-50 ms late (a plain httpx client timed the stub's 0.5 s TTFT at 527-555
# ms; docs/performance.md, "Threads pinned to cores"), while the tokens after it kept the stub's schedule.
FIRST_TOKEN_SLACK_S = 0.1


def first_token_near(value: float | None, expected: float) -> bool:
    """A first token's time: never before the stub sent it, at most FIRST_TOKEN_SLACK_S after."""
    return value is not None and 0.99 * expected <= value <= expected + FIRST_TOKEN_SLACK_S


# --- workloads and prompts -------------------------------------------------------------------


def test_workload_presets_scale_and_custom() -> None:
    assert (resolve_workload("short").input_tokens, resolve_workload("short").output_tokens) == (100, 300)
    assert (resolve_workload("long").input_tokens, resolve_workload("long").output_tokens) == (10000, 1500)
    small = resolve_workload("medium", scale=0.2)
    assert (small.name, small.input_tokens, small.output_tokens, small.scale) == ("medium", 200, 200, 0.2)
    custom = resolve_workload("short", output_tokens=42)
    assert (custom.name, custom.input_tokens, custom.output_tokens) == ("custom", 100, 42)
    with pytest.raises(ValueError, match="--scale"):
        resolve_workload("short", scale=0)
    with pytest.raises(ValueError, match="--workload"):
        resolve_workload("huge")
    with pytest.raises(ValueError, match="--input-tokens"):
        resolve_workload("short", input_tokens=0)


def test_prompts_are_unique_deterministic_and_real_text() -> None:
    corpus_words = set(load_corpus().replace("\n", " ").split())
    assert len(split_sentences(load_corpus())) > 150
    prompts = [builder().build(f"0.4.{u}.{s}", 100) for u in range(10) for s in range(20)]
    assert len({p.text for p in prompts}) == len(prompts)
    bodies = [p.text.split("\n", 1)[1] for p in prompts]
    assert len({b[:80] for b in bodies}) > 150  # not one text behind different headers
    assert builder().build("0.4.3.7", 100) == prompts[3 * 20 + 7]
    other_seed = PromptBuilder(load_corpus(), seed=1, counter=CharEstimate()).build("0.4.3.7", 100)
    assert other_seed.text != prompts[3 * 20 + 7].text
    for prompt in prompts[:20]:
        assert 360 <= len(prompt.text) <= 400 and prompt.input_tokens <= 100
        words = prompt.text.split("\n", 1)[1].split()
        assert all(w in corpus_words for w in words[:-1])  # the last word may be cut short
    long = builder().build("x", 10_000)
    assert 39_000 < len(long.text) <= 40_000


def test_prompt_lengths_with_a_tokenizer(tiny_llama: Path) -> None:
    counter = TokenizerFileCounter(tiny_llama / "tokenizer.json")
    made = PromptBuilder(load_corpus(), seed=0, counter=counter)
    for tokens in (60, 300, 2000):
        prompt = made.build(f"k{tokens}", tokens)
        assert prompt.counted_by == "tokenizer"
        assert tokens - 2 <= prompt.input_tokens <= tokens
    with pytest.raises(ValueError, match="--tokenizer"):
        TokenizerFileCounter(tiny_llama / "missing.json")


def test_workload_edges() -> None:
    """A scale rounds to the nearest token (0.29 x 100 is 29, not the float's 28.99 cut to 28) and never below
    one token; an infinite or NaN scale is refused by name rather than failing inside round()."""
    assert resolve_workload("short", scale=0.29).input_tokens == 29
    assert (resolve_workload("short", scale=0.001).input_tokens, resolve_workload("short", 0.001).output_tokens) == (
        1,
        1,
    )
    for bad in (float("inf"), float("nan"), -0.5):
        with pytest.raises(ValueError, match="--scale"):
            resolve_workload("short", scale=bad)


def test_prompt_edges_header_cutting_and_lengthening() -> None:
    """The key heads every prompt (what makes two keys' prompts differ); one token still gives the whole
    header; the estimate cuts at a word boundary when one is near and counts an exact fit as fitting; and a
    counter that finds fewer tokens than the 4 chars/token guess gets a longer text, up to the count asked."""
    prompt = builder().build("7.1.0.3", 50)
    assert prompt.text.startswith("[7.1.0.3] Continue this passage:\n")
    assert builder().build("k", 1).text == "[k] Continue this passage:"
    with pytest.raises(ValueError, match="at least 1 token"):
        builder().build("k", 0)
    with pytest.raises(ValueError, match="two sentences"):
        PromptBuilder("Only one sentence here.", seed=0, counter=CharEstimate())
    estimate = CharEstimate()
    assert estimate.truncate("abcde fg", 2) == "abcde fg"  # 8 characters are 2 tokens: nothing to cut
    assert estimate.truncate("one two three", 2) == "one two"  # cut at the last space, not mid-way "one two "
    assert estimate.truncate("abcdefghij", 2) == "abcdefgh"  # no space near the end: cut at the budget
    words = PromptBuilder(load_corpus(), seed=0, counter=_Words()).build("w", 300)  # words run ~6 chars a token
    assert words.input_tokens == 300 and words.counted_by == "tokenizer"


# --- per-request figures ---------------------------------------------------------------------


class _Words:
    """A tokenizer whose tokens are words: counts the test can read off the texts."""

    method = "tokenizer"

    def count(self, text: str) -> int:
        return len(text.split())

    def truncate(self, text: str, tokens: int) -> str:
        return " ".join(text.split()[:tokens])


def test_the_output_speed_leaves_out_the_first_chunks_tokens_and_counts_without_usage() -> None:
    """Speed counted every token after the first as arriving after the first chunk: a server sending its
    first five at once read 25.3 tok/s where it streams at 20; and without usage each chunk counted one
    token, whatever it held."""

    times = (0.2, *(0.25 + 0.05 * i for i in range(15)))
    texts = (" a b c d e", *(" w" for _ in range(15)))
    args = dict(key="k", user=0, seq=0, started_s=0.0, requested_output_tokens=20, prompt_tokens=10)
    args |= dict(prompt_counted_by="usage", prompt_chars=40)
    with_usage = derive_result(StreamTrace(times, texts, 1.0, 10, 20), **args, counter=_Words())
    assert with_usage.output_speed_tps == pytest.approx(15 / 0.75)
    bare = StreamTrace(times, texts, 1.0)  # no usage sent
    counted = derive_result(bare, **args, counter=_Words())
    assert (counted.output_tokens, counted.output_tokens_source) == (20, "tokenizer")
    assert counted.output_speed_tps == pytest.approx(15 / 0.75)
    chunks = derive_result(bare, **args, counter=None)
    assert (chunks.output_tokens, chunks.output_tokens_source) == (16, "chunks")
    # four tokens a chunk, no tokenizer: the first chunk's are placed as the rest are
    even = derive_result(StreamTrace((0.2, 0.3, 0.4), (" a b c d",) * 3, 1.0, 10, 12), **args)
    assert even.output_speed_tps == pytest.approx(8 / 0.2)
    # more chunks than tokens (a server splitting tokens): the first chunk still holds the first token, which
    # the speed leaves out (it counted all 10 over the 19 gaps)
    split = derive_result(StreamTrace(tuple(0.2 + 0.05 * i for i in range(20)), (" x",) * 20, 1.0, 10, 10), **args)
    assert split.output_speed_tps == pytest.approx(9 / 0.95)


def test_first_sentence_and_token_placement() -> None:
    # the chunk with the whitespace after the mark, as the engine stamps it: at the mark's own chunk ("."),
    # a client cannot yet tell "world." from "3.14" (it was one chunk early)
    assert first_sentence_chunk(["Hello", " world", ".", " Next"]) == 3
    assert first_sentence_chunk(["Hello world.\nMore"]) == 0
    assert first_sentence_chunk(["It", " ends!"]) == 1  # the output ends: its last chunk
    assert first_sentence_chunk(["pi is 3.14", " or so"]) == 1  # no sentence mark: the end of the output
    assert first_sentence_chunk(["", " "]) is None  # no text at all
    assert [token_chunk(k, 6, 6) for k in (1, 6)] == [0, 5]
    assert [token_chunk(k, 120, 30) for k in (1, 4, 5, 100, 120)] == [0, 0, 1, 24, 29]


def test_percentiles() -> None:
    stat = describe(float(v) for v in range(1, 101))
    assert (stat.n, stat.mean, stat.p50) == (100, 50.5, 50.5)
    assert stat.p90 == pytest.approx(90.1) and stat.p99 == pytest.approx(99.01)
    assert describe([None, None]).p50 is None
    assert describe([3.0]).p99 == 3.0


# --- the harness against the stub: known TTFT and rate ----------------------------------------


def test_figures_match_the_stub_within_5_percent() -> None:
    ttft, interval, tokens = (
        0.5,
        0.01,
        120,
    )  # 100 tokens/s; a time base long enough that scheduling noise on a busy 2-core machine stays under 5 %
    with stub_server("--ttft", str(ttft), "--interval", str(interval)) as url:
        target = Target("stub", url, "stub-model")
        config = sweep_config(concurrency=(1, 3))
        recorder = Recorder()
        outcome = run_sweep([target], config, builder(), recorder)
    assert not outcome.interrupted and recorder.started == [("stub", 1, 0), ("stub", 3, 0)]
    per_request = ttft + (tokens - 1) * interval
    for summary in report_of(outcome, config, [target]).summaries:
        c = summary.concurrency
        assert summary.errors == 0 and summary.ok == 2 * c
        stats = summary.stats
        assert stats.output_tokens.p50 == tokens
        assert first_token_near(stats.ttft_s.p50, ttft), stats.ttft_s
        # the speed counts from the first token: one FIRST_TOKEN_SLACK_S late shortens its span by that much
        late_speed = (tokens - 1) / ((tokens - 1) * interval - FIRST_TOKEN_SLACK_S)
        assert 0.95 / interval <= stats.output_speed_tps.p50 <= late_speed, stats.output_speed_tps
        assert close_to(stats.first_sentence_s.p50, ttft + 7 * interval), stats.first_sentence_s
        assert close_to(stats.e2e_100_s.p50, ttft + 99 * interval), stats.e2e_100_s
        assert close_to(stats.total_s.p50, per_request), stats.total_s
        assert close_to(summary.output_tokens_per_s, c * tokens / per_request), summary.output_tokens_per_s
        assert close_to(summary.requests_per_s, c / per_request), summary.requests_per_s
    record = outcome.measurements[0].requests[0]
    assert (record.output_tokens_source, record.input_tokens_source, record.input_tokens) == ("usage", "usage", 11)


def test_counts_without_usage_and_with_multi_token_chunks() -> None:
    ttft, interval = 0.5, 0.01  # a time base long enough that scheduling noise on a busy machine stays under 5 %
    with stub_server("--ttft", str(ttft), "--interval", str(interval), "--no-usage") as url:
        plain = run_sweep([Target("s", url, "m")], sweep_config(warmup=0, requests_per_user=1), builder(), Recorder())
    result = plain.measurements[0].requests[0]
    assert (result.output_tokens, result.output_tokens_source, result.chunks) == (120, "chunks", 120)
    assert result.input_tokens_source == "estimate" and result.input_tokens == 40
    with stub_server("--ttft", str(ttft), "--interval", str(interval), "--tokens-per-chunk", "4") as url:
        grouped = run_sweep([Target("s", url, "m")], sweep_config(requests_per_user=1), builder(), Recorder())
    result = grouped.measurements[0].requests[0]
    assert (result.output_tokens, result.output_tokens_source, result.chunks) == (120, "usage", 30)
    assert close_to(result.e2e_100_s, ttft + 99 * interval)  # token 100 rides in chunk 25
    assert first_token_near(result.ttft_s, ttft + 3 * interval)  # the first chunk carries tokens 1-4


def test_server_errors_are_counted_not_fatal() -> None:
    with stub_server("--ttft", "0.02", "--interval", "0.001", "--fail-every", "3", "--drop-every", "4") as url:
        target = Target("stub", url, "m")
        config = sweep_config(concurrency=(2,), requests_per_user=6, warmup=0, api=Api.CHAT)
        outcome = run_sweep([target], config, builder(), Recorder())
    (summary,) = report_of(outcome, config, [target]).summaries
    kinds = {kind: count for kind, count, _ in summary.error_kinds}
    assert kinds == {"http_500": 4, "dropped": 2}  # requests 3, 6, 9, 12 fail; 4 and 8 are cut off
    assert (summary.requests, summary.ok, summary.errors) == (12, 6, 6)
    assert summary.stats.ttft_s.n == 6 and summary.output_tokens_per_s > 0
    dropped = [r for m in outcome.measurements for r in m.requests if r.error_kind == "dropped"]
    assert all(r.chunks == 60 and r.ttft_s is None for r in dropped)


def test_ignore_eos_is_sent_and_short_outputs_are_reported() -> None:
    with stub_server("--ttft", "0.02", "--interval", "0.001", "--eos-after", "10") as url:
        target = Target("stub", url, "m")
        forced = run_sweep([target], sweep_config(warmup=0), builder(), Recorder())
        free_config = sweep_config(warmup=0, ignore_eos=False)
        free = run_sweep([target], free_config, builder(), Recorder())
    assert {r.output_tokens for r in forced.measurements[0].requests} == {120}
    (summary,) = report_of(free, free_config, [target]).summaries
    assert summary.stats.output_tokens.p50 == 10 and summary.short_outputs == 2
    assert summary.e2e_100_projected == 2 and summary.stats.e2e_100_s.p50 is not None


def test_unreachable_server_is_counted() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = run_sweep(
        [Target("gone", f"http://127.0.0.1:{port}", "m")], sweep_config(warmup=1), builder(), Recorder()
    )
    (measurement,) = outcome.measurements
    assert len(measurement.warmup_errors) == 1
    assert [r.error_kind for r in measurement.requests] == ["transport", "transport"]


# --- the streaming client against scripted servers: what it sends, how each failure is named ----------------


def _stream(url: str, api: Api = Api.COMPLETIONS, timeout_s: float = 10.0):
    """One stream_request on a client with no timeouts of its own (so only stream_request's bounds the wait)."""

    async def go():
        async with httpx.AsyncClient(timeout=None) as http:
            spec = RequestSpec("Say hi.", 5, True, 0.0)
            return await asyncio.wait_for(stream_request(http, url, api, "m", spec, timeout_s), 20)

    return asyncio.run(go())


_EVENT = chunk(b'data: {"choices": [{"index": 0, "text": "Hi"}]}\n\n')
_DONE = chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


@pytest.mark.parametrize(("api", "path"), [(Api.CHAT, b"/v1/chat/completions"), (Api.COMPLETIONS, b"/v1/completions")])
def test_each_api_posts_its_body_to_its_own_path(api: Api, path: bytes) -> None:
    """The chat API sends `messages` to /v1/chat/completions and the completions API `prompt` to
    /v1/completions, streamed, usage asked for, ignore_eos when set."""
    with ScriptedServer([sse_head(), _DONE]) as server:
        trace = _stream(server.url, api)
    assert trace.error_kind is None, trace.error
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    sent = json.loads(body)
    assert head.split(b" ")[:2] == [b"POST", path]
    assert (sent["stream"], sent["stream_options"], sent["ignore_eos"], sent["max_tokens"]) == (
        True,
        {"include_usage": True},
        True,
        5,
    )
    if api is Api.CHAT:
        assert sent["messages"] == [{"role": "user", "content": "Say hi."}] and "prompt" not in sent
    else:
        assert sent["prompt"] == "Say hi." and "messages" not in sent


def test_empty_role_chunks_are_not_content() -> None:
    """A chat stream opens with a chunk whose delta has the role and empty content: it is not the first token
    (it would have set the TTFT to the role chunk's time) and not a chunk of output."""
    role = chunk(b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n')
    words = [chunk(f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{w}"}}}}]}}\n\n'.encode()) for w in "ab"]
    usage = chunk(b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n')
    with ScriptedServer([sse_head(), role, 0.2, *words, usage, _DONE]) as server:
        trace = _stream(server.url, Api.CHAT)
    assert trace.error_kind is None, trace.error
    assert trace.chunk_texts == ("a", "b") and len(trace.chunk_times) == 2
    assert trace.chunk_times[0] >= 0.2  # the first content came after the pause, not with the role chunk
    assert (trace.usage_prompt_tokens, trace.usage_completion_tokens) == (7, 2)


@pytest.mark.parametrize(
    ("parts", "reset", "kind", "says"),
    [
        (
            [sse_head(), _EVENT, chunk(b'data: {"error": {"message": "boom"}}\n\n'), _DONE],
            False,
            "server_error",
            "boom",
        ),
        ([sse_head(), _EVENT, chunk(b"data: {not json\n\n"), _DONE], False, "bad_sse", "malformed"),
        ([sse_head(), chunk(b"data: [1, 2]\n\n"), _DONE], False, "bad_sse", "not a JSON object"),
        ([sse_head(), _EVENT, b"0\r\n\r\n"], False, "incomplete", "[DONE]"),  # a clean end, but no [DONE]
        ([sse_head(), _EVENT, 0.2], True, "dropped", "ReadError"),  # the connection reset mid-stream
        ([sse_head(), _EVENT, HOLD], False, "timeout", "within 0.5 s"),  # a hung server
        ([b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"], False, "http_503", "busy"),
    ],
)
def test_each_failure_of_a_stream_is_counted_under_its_own_kind(parts, reset, kind, says) -> None:
    """A request never raises: an error event, a body that is not SSE JSON, a stream that ends without
    [DONE], a reset connection, a server that hangs past --request-timeout, a refusal: each comes back in the
    trace under its kind, so that the report tells them apart (a hang was not "transport", an error event not
    a success)."""
    with ScriptedServer(parts, reset=reset) as server:
        trace = _stream(server.url, timeout_s=0.5)
    assert trace.error_kind == kind, trace.error
    assert says in trace.error


def test_the_model_is_discovered_or_defaulted_with_the_reason() -> None:
    """GET /v1/models: its first id; a refusal or an empty list sends 'default' and says why."""

    def answer(status: int, payload: object):
        def handler(request: httpx.Request) -> httpx.Response:
            assert request.url.path == "/v1/models"
            return httpx.Response(status, json=payload)

        return handler

    async def found(status: int, payload: object):
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer(status, payload))) as http:
            return await discover_model(http, "http://peer")

    listed = asyncio.run(found(200, {"data": [{"id": "first"}, {"id": "second"}]}))
    assert (listed.model, listed.how) == ("first", "first id from GET /v1/models")
    refused = asyncio.run(found(404, {"data": [{"id": "ignored"}]}))
    assert refused.model == "default" and "HTTP 404" in refused.how
    empty = asyncio.run(found(200, {"data": []}))
    assert empty.model == "default" and "IndexError" in empty.how


# --- the sweep's order, keys, bodies and bookkeeping, against scripted servers ------------------------------


def _scripted_stream() -> list[bytes]:
    """A whole completions stream of two tokens with usage, as every scripted answer of the sweep tests."""
    events = [b'{"choices": [{"index": 0, "text": " a"}]}', b'{"choices": [{"index": 0, "text": " b"}]}']
    events.append(b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
    return [sse_head(), *(chunk(b"data: " + e + b"\n\n") for e in events), _DONE]


def test_the_sweep_interleaves_targets_and_sends_each_round_fresh_prompts() -> None:
    """For each round, each concurrency level, each target (A B A B, never all of A's levels first); every
    request carries the configured max_tokens and temperature; and no prompt repeats within a target, across
    rounds and levels too (a repeat would be served from the prefix cache)."""
    with ScriptedServer(_scripted_stream()) as a, ScriptedServer(_scripted_stream()) as b:
        targets = [Target("a", a.url, "m"), Target("b", b.url, "m")]
        config = sweep_config(concurrency=(1, 2), rounds=2, requests_per_user=1, warmup=0, temperature=0.7)
        recorder = Recorder()
        outcome = run_sweep(targets, config, builder(), recorder)
    assert recorder.started == [(t, c, r) for r in (0, 1) for c in (1, 2) for t in ("a", "b")]
    assert all(m.complete and all(q.ok for q in m.requests) for m in outcome.measurements)
    for server in (a, b):
        bodies = [json.loads(raw.partition(b"\r\n\r\n")[2]) for raw in server.requests]
        assert len(bodies) == 6 and len({body["prompt"] for body in bodies}) == 6
        assert {(body["max_tokens"], body["temperature"]) for body in bodies} == {(120, 0.7)}
    assert config.planned_requests(len(targets)) == 12 == len(recorder.done)
    assert sweep_config(concurrency=(1, 3), rounds=2, requests_per_user=2).planned_requests(3) == 48


def test_an_interrupt_before_a_measurements_first_answer_keeps_no_empty_measurement() -> None:
    """Ctrl-C as a measurement starts: the finished ones are kept, the one with no request done is not added
    (an empty measurement would be a row of zeros in the report)."""

    class StopAtSecond(Recorder):
        def measurement_started(self, target: Target, concurrency: int, round_index: int) -> None:
            super().measurement_started(target, concurrency, round_index)
            if len(self.started) == 2:
                raise KeyboardInterrupt

    with ScriptedServer(_scripted_stream()) as server:
        config = sweep_config(concurrency=(1, 2), requests_per_user=1, warmup=0)
        outcome = run_sweep([Target("s", server.url, "m")], config, builder(), StopAtSecond())
    assert outcome.interrupted
    assert [(m.concurrency, m.complete, len(m.requests)) for m in outcome.measurements] == [(1, True, 1)]


def _one_request(trace: StreamTrace) -> RequestResult:
    """The result of a one-token request (user 0, sequence 0) whose stream was `trace`."""
    return derive_result(
        trace,
        key="k",
        user=0,
        seq=0,
        started_s=0.0,
        requested_output_tokens=1,
        prompt_tokens=1,
        prompt_counted_by="usage",
        prompt_chars=4,
    )


def test_a_measurements_requests_are_listed_by_user_then_sequence() -> None:
    """Requests finish in any order; the measurement lists them by (user, seq), so files compare run to run."""
    from dataclasses import replace

    from metronome.bench.runner import _OpenMeasurement

    one = _one_request(StreamTrace((0.1,), ("a",), 0.2, 1, 1))
    open_measurement = _OpenMeasurement(Target("t", "http://x", "m"), 2, 0)
    open_measurement.requests = [replace(one, user=u, seq=q) for u, q in ((1, 1), (0, 1), (1, 0), (0, 0))]
    closed = open_measurement.close(complete=False)
    assert [(r.user, r.seq) for r in closed.requests] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        (dict(concurrency=()), "--concurrency"),
        (dict(concurrency=(2, 0)), "--concurrency"),
        (dict(requests_per_user=0), "--requests-per-user"),
        (dict(warmup=-1), "--warmup"),
        (dict(request_timeout_s=0.0), "--request-timeout"),
        (dict(request_timeout_s=float("nan")), "--request-timeout"),
    ],
)
def test_a_sweep_config_refuses_what_cannot_run(change: dict, flag: str) -> None:
    """A level of 0 users, no request per user, a negative warm-up or a timeout that is not positive is
    refused when the config is made, naming the option."""
    with pytest.raises(ValueError, match=flag):
        sweep_config(**change)


def test_run_sweep_refuses_no_targets_and_twin_names() -> None:
    """Two targets of one name would merge in the report; no target at all measures nothing."""
    with pytest.raises(ValueError, match="nothing to measure"):
        run_sweep([], sweep_config(), builder(), Recorder())
    with pytest.raises(ValueError, match="must differ"):
        run_sweep([Target("x", "http://a", "m"), Target("x", "http://b", "m")], sweep_config(), builder(), Recorder())


# --- peers side by side, the report, the schema -------------------------------------------------


def test_two_targets_interleave_and_ratios_validate(tmp_path: Path) -> None:
    with (
        stub_server("--ttft", "0.4", "--interval", "0.01") as fast,
        stub_server("--ttft", "0.8", "--interval", "0.02") as slow,
    ):
        targets = [Target("metronome", fast, "m"), Target("other", slow, "m")]
        config = sweep_config(rounds=2, requests_per_user=1, warmup=0, workload=resolve_workload("short", 0.2))
        recorder = Recorder()
        outcome = run_sweep(targets, config, builder(), recorder)
    assert recorder.started == [("metronome", 1, 0), ("other", 1, 0), ("metronome", 1, 1), ("other", 1, 1)]
    report = report_of(outcome, config, targets)
    document = report_json(report)
    jsonschema.validate(document, load_schema())
    assert document["baseline"] == "metronome"
    other = next(s for s in document["summaries"] if s["target"] == "other")
    assert close_to(other["ratio_to_baseline"]["ttft_s.p50"], 2.0)
    assert close_to(other["ratio_to_baseline"]["output_speed_tps.p50"], 0.5)
    files = write_report(report, tmp_path)
    assert "(2.0" in files.markdown.read_text() or "(1.9" in files.markdown.read_text()
    broken = json.loads(files.json.read_text())
    broken["summaries"][0]["metrics"]["ttft_s"]["p50"] = "fast"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema())
    del broken["measurements"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema())


def test_cli_writes_json_markdown_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    with stub_server("--ttft", "0.02", "--interval", "0.002", "--fail-every", "7") as url:
        code = cli.main(
            ["--url", url + "/v1/", "--workload", "short", "--scale", "0.2", "--concurrency", "1,2"]
            + ["--rounds", "2", "--out", str(out), "--no-progress"]
        )
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    jsonschema.validate(document, load_schema())
    assert document["config"]["workload"] == {"name": "short", "input_tokens": 20, "output_tokens": 60, "scale": 0.2}
    assert document["targets"][0]["model"] == "stub-model"
    assert sum(s["errors"] for s in document["summaries"]) >= 1
    assert "| 2 | server |" in (out / "results.md").read_text()
    assert "| 1 | server |" in capsys.readouterr().out
    for name in ("speed_vs_throughput.png", "ttft_vs_concurrency.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_the_progress_bar_counts_requests_and_errors_where_the_sweep_is() -> None:
    """The bar shows the target, level and round (counted from 1) of the measurement running, the requests
    done of those planned, and how many failed; disabled (--no-progress) it prints nothing."""
    import io

    from rich.console import Console

    from metronome.bench.progress import SweepProgress

    ok = _one_request(StreamTrace((0.1,), ("a",), 0.2, 1, 1))
    failed = _one_request(StreamTrace((), (), 0.2, error_kind="http_500", error="HTTP 500"))
    target = Target("srv", "http://x", "m")
    for enabled in (True, False):
        shown = io.StringIO()
        with SweepProgress(5, 3, Console(file=shown, width=120, force_terminal=False), enabled=enabled) as bar:
            bar.measurement_started(target, 4, 1)
            for result in (ok, failed, failed):
                bar.request_done(target, result)
        said = " ".join(shown.getvalue().split())
        if enabled:
            assert said.startswith("srv c=4 round 2/3, 2 error(s) ") and " 3/5 " in said, said
        else:
            assert said == ""


def test_interrupt_from_a_hook_keeps_partial_results(tmp_path: Path) -> None:
    with stub_server("--ttft", "0.01", "--interval", "0.001") as url:
        target = Target("stub", url, "m")
        config = sweep_config(rounds=2, requests_per_user=5, warmup=0)
        outcome = run_sweep([target], config, builder(), Recorder(interrupt_after=3))
    assert outcome.interrupted
    (partial,) = outcome.measurements
    assert not partial.complete and len(partial.requests) == 3
    # its window ends with its last finished request, not at the interrupt (which lowered req/s and tok/s)
    assert partial.wall_s == pytest.approx(max(r.started_s + r.total_s for r in partial.requests))
    document = report_json(report_of(outcome, config, [target]))
    jsonschema.validate(document, load_schema())
    assert document["interrupted"] and document["summaries"][0]["ok"] == 3


def test_ctrl_c_signal_writes_partial_results(tmp_path: Path) -> None:
    out = tmp_path / "partial"
    # A process started in the background by a non-interactive shell (as CI may be) ignores SIGINT from birth;
    # this test is about what Ctrl-C does, so it gives the process Python's own SIGINT handler while it runs.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with stub_server("--ttft", "0.05", "--interval", "0.03") as url:  # ~1.9 s a request: ~2 done of 15 at 4 s
        timer = threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            code = cli.main(
                ["--url", url, "--input-tokens", "20", "--output-tokens", "60", "--concurrency", "1"]
                + ["--rounds", "5", "--requests-per-user", "3", "--warmup", "0", "--out", str(out), "--no-progress"]
            )
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)
    assert code == 130
    document = json.loads((out / "results.json").read_text())
    jsonschema.validate(document, load_schema())
    assert document["interrupted"]
    done = sum(len(m["requests"]) for m in document["measurements"])
    assert 1 <= done < 15


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--url", "ftp://x"], "--url"),
        (["--url", "http://127.0.0.1:9", "--scale", "-1"], "--scale"),
        (["--model", "m.gguf", "--compare", "metronome,vllm"], "--compare"),
        (["--url", "http://127.0.0.1:9", "--compare", "transformers"], "--compare"),
        (["--url", "http://127.0.0.1:9", "--rounds", "0"], "--rounds"),
    ],
)
def test_cli_rejects_bad_options(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_hands_its_options_to_the_sweep_and_fails_when_every_request_failed(tmp_path: Path) -> None:
    """--no-ignore-eos, --request-timeout, --api and --temperature (2 is the API's top, allowed) reach the
    requests and the report; a sweep whose every request failed exits 1, not 0."""
    refusal = [b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nnope"]
    out = tmp_path / "run"
    with ScriptedServer(refusal) as server:
        code = cli.main(
            ["--url", server.url, "--input-tokens", "8", "--output-tokens", "4", "--concurrency", "1", "--rounds", "1"]
            + ["--requests-per-user", "1", "--warmup", "0", "--no-ignore-eos", "--request-timeout", "7"]
            + ["--api", "completions", "--temperature", "2", "--out", str(out), "--no-progress"]
        )
    assert code == 1
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["ignore_eos"], config["request_timeout_s"], config["api"]) == (False, 7.0, "completions")
    sent = json.loads(server.requests[-1].partition(b"\r\n\r\n")[2])
    assert server.requests[-1].startswith(b"POST /v1/completions ") and "ignore_eos" not in sent
    assert sent["temperature"] == 2.0


def test_concurrency_levels_are_sorted_unique_and_at_least_one() -> None:
    """`--concurrency 4,1,2,2` runs 1, 2, 4 once each; a level below 1 or a word is refused."""
    import argparse

    assert cli._levels("4,1,2,2") == (1, 2, 4) and cli._levels(" 3 ,") == (3,)
    for bad in ("0,1", "-2", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            cli._levels(bad)


def test_cli_names_an_unreachable_url(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert cli.main(["--url", f"http://127.0.0.1:{port}", "--no-progress"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_url_normalization() -> None:
    assert normalize_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert normalize_base_url("https://h/api/v1") == "https://h/api"
    for bad in ("127.0.0.1:8000", "http://", "http:///v1"):  # no scheme, or no host to reach
        with pytest.raises(ValueError, match="--url"):
            normalize_base_url(bad)


def test_peer_names_commands_and_llama_cpp_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peers.parse_peers("metronome, llama.cpp,transformers") == tuple(peers.Peer)
    for bad in ("vllm", "metronome,metronome", ""):
        with pytest.raises(ValueError, match="--compare"):
            peers.parse_peers(bad)
    assert peers.context_for(resolve_workload("short")) == 768  # 150 + 300 + 64, rounded up
    assert peers.context_for(resolve_workload("long")) >= 15_000 + 1500
    assert peers.context_for(resolve_workload("short", input_tokens=1000, output_tokens=100)) == 1792  # 1664 up
    llama = peers.launch_spec(peers.Peer.LLAMA_CPP, Path("m.gguf"), 1234, 2, "float32", 512)
    assert llama.argv[1:3] == ("-m", "llama_cpp.server") and ("--n_threads", "2") == llama.argv[5:7]
    assert llama.argv[llama.argv.index("--n_ctx") + 1] == "512"
    assert ("--host", "127.0.0.1") == llama.argv[-4:-2] and llama.argv[-1] == "1234"
    assert llama.ready_path == "/v1/models"  # llama-cpp-python's server has no /health
    hf = peers.launch_spec(peers.Peer.TRANSFORMERS, Path("m.gguf"), 1234, 3, "bfloat16", 512)
    assert "metronome.bench.hf_server" in hf.argv and hf.argv[hf.argv.index("--threads") + 1] == "3"
    real_find_spec = peers.importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real_find_spec(name)
    )
    with pytest.raises(peers.PeerUnavailable, match=r"llama-cpp-python\[server\]==0.3.36"):
        peers.check_available(peers.Peer.LLAMA_CPP)
    with pytest.raises(peers.PeerUnavailable, match="llama-cpp-python"):  # before any peer starts
        with peers.running_peers([peers.Peer.LLAMA_CPP], Path("m.gguf"), 1, "float32", 512, Path("logs"), 5, print):
            pass


def _sleeper(code: str, log: Path) -> subprocess.Popen:
    """A stand-in peer process running `code`, its output to `log`."""
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)


def test_wait_ready_tells_ready_from_exited_from_never_ready(tmp_path: Path) -> None:
    """Ready is a 200 from the readiness URL; a 503 (still loading) is not ready, and past the deadline it
    says the last answer; a peer that exits is reported at once with its exit code and its log's tail
    (it was found only at the deadline)."""
    log = tmp_path / "peer.log"
    waiting = _sleeper("import time; time.sleep(60)", log)
    try:
        with ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]) as up:
            peers.wait_ready(waiting, up.url + "/health", 10, log, "up", poll_s=0.05)
        loading = [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\n\r\nloading"]
        with ScriptedServer(loading) as busy:
            with pytest.raises(peers.PeerStartError, match=r"not ready .* after 0.5 s \(last: HTTP 503\)"):
                peers.wait_ready(waiting, busy.url + "/health", 0.5, log, "busy", poll_s=0.05)
    finally:
        waiting.kill()
        waiting.wait(timeout=10)
    crashed = _sleeper("print('no such model file', flush=True); raise SystemExit(3)", log)
    began = time.monotonic()
    with pytest.raises(peers.PeerStartError, match=r"exited with code 3[\s\S]*no such model file"):
        peers.wait_ready(crashed, "http://127.0.0.1:9/health", 60, log, "crashed", poll_s=0.05)
    assert time.monotonic() - began < 30  # not the 60 s deadline


@pytest.mark.timeout(60)
def test_a_peer_that_ignores_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    """Stopping a peer: SIGTERM, then SIGKILL once the grace is over, so the bench never waits on a stuck
    peer forever; a peer that heeds SIGTERM is not killed."""
    stuck = _sleeper(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)",
        tmp_path / "stuck.log",
    )
    deadline = time.monotonic() + 20
    while "up" not in (tmp_path / "stuck.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)  # the handler is in place before it is stopped
    peers._stop(stuck, grace_s=0.3)
    assert stuck.returncode == -signal.SIGKILL
    polite = _sleeper("import time; time.sleep(60)", tmp_path / "polite.log")
    peers._stop(polite, grace_s=30)
    assert polite.returncode == -signal.SIGTERM  # asked first: killed only past the grace


def test_running_peers_refuses_a_missing_model_before_starting_anything(tmp_path: Path) -> None:
    """A --model path that does not exist is named at once, before any peer starts or a log folder is made."""
    with pytest.raises(FileNotFoundError, match="--model"):
        with peers.running_peers(
            [peers.Peer.METRONOME], tmp_path / "nope.gguf", 1, "float32", 256, tmp_path / "logs", 5, print
        ):
            pass
    assert not (tmp_path / "logs").exists()


def test_engine_flags_reach_the_server_it_starts_and_unused_ones_are_refused(capsys) -> None:
    """bench's engine flags went nowhere in some modes (--slots and --kv-cache with --decode-only, every one
    but --spec-tokens for a metronome peer): a server it starts gets those set, and a mode refuses the ones
    it would not use."""
    import argparse

    from metronome.args import engine_argv

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--slots", "3", "--kv-cache", "int8", "--prefill-chunk", "16", "--threads", "2"])
    flags = engine_argv(args, ("spec_tokens", "draft", "slots", "prefill_chunk", "kv_cache"))
    assert flags == ["--slots", "3", "--prefill-chunk", "16", "--kv-cache", "int8"]  # defaults are left out
    spec = peers.launch_spec(peers.Peer.METRONOME, Path("m.gguf"), 1234, 2, "float32", 512, flags)
    assert spec.argv[spec.argv.index("--slots") + 1] == "3" and spec.argv[spec.argv.index("--kv-cache") + 1] == "int8"
    for argv, words in (
        (["--decode-only", "--slots", "3"], "--decode-only does not use --slots"),
        (["--speculation", "--prefill-chunk", "8"], "does not use --prefill-chunk"),
        (["--url", "http://127.0.0.1:9", "--slots", "2", "--kv-cache", "int8"], "does not use --slots, --kv-cache"),
    ):
        assert cli.main(argv) == 2
        assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--load", "1,4", "--workload", "long"], "--load does not use --workload"),
        (["--decode-only", "--concurrency", "1,2"], "--decode-only does not use --concurrency"),
        (["--decode-only", "--load", "1"], "--decode-only does not use --load"),
        (["--speculation", "--live", "1,2", "--temperature", "1"], "does not use --live, --temperature"),
        (["--url", "http://127.0.0.1:9", "--live", "2"], "a sweep (--url or --model without a mode flag)"),
        (["--url", "http://127.0.0.1:9", "--stall"], "does not use --stall"),
        (["--voice", "--workload", "long"], "--voice does not use --workload"),
        (["--soak", "1s", "--concurrency", "2"], "--soak does not use --concurrency"),
        (["--fuzz", "2", "--users", "3"], "--fuzz does not use --users"),
        # given at their default values: they were judged unset, and `--slots 8 --live 9` ran 9 slots
        (["--decode-only", "--live", "9", "--slots", "8"], "--decode-only does not use --slots"),
        (["--url", "http://127.0.0.1:9", "--spec-tokens", "4"], "does not use --spec-tokens"),
        (["--load", "1", "--workload", "short"], "--load does not use --workload"),
    ],
)
def test_a_flag_the_mode_does_not_read_is_refused(capsys, argv, words) -> None:
    """Flags a mode never reads were dropped silently: `--load 1,4 --workload long` measured the default
    200 tokens, `--decode-only --concurrency 1,2` one slot. Refused before anything starts, also when given
    their default value."""
    assert cli.main(argv) == 2
    assert words in capsys.readouterr().err


def test_flags_a_mode_reads_are_not_refused() -> None:
    """The table of what each mode reads: every flag of the mode's own help text ("with --load: ...") is there."""
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for action in parser._actions:
        for mode in cli._READS:
            if action.help and action.help.startswith(f"with {mode}"):
                assert action.dest in cli._READS[mode], (action.dest, mode)
    for flags in (["--load", "1", "--stall", "--in-process-only", "--rounds", "2", "--output-tokens", "8"],):
        args = parser.parse_args(flags)
        assert cli._unread(args) is None


# --- the transformers baseline server ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) with a BPE tokenizer trained here on the bench corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([load_corpus()], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def served(app: object) -> Iterator[str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_hf_server_streams_counts_and_refuses_clearly(tiny_llama: Path) -> None:
    from metronome.bench.hf_server import build_app, load_backend

    backend = load_backend(tiny_llama, "float32")
    try:
        with served(build_app(backend)) as url:

            async def talk() -> list:
                async with httpx.AsyncClient(timeout=30) as http:
                    spec = RequestSpec("The river town woke slowly.", 12, True, 0.0)
                    completion = await stream_request(http, url, Api.COMPLETIONS, "x", spec, 30)
                    chat = await stream_request(http, url, Api.CHAT, "x", RequestSpec("Hello there.", 8, True, 0.7), 30)
                    whole = await http.post(f"{url}/v1/completions", json={"prompt": "Bread is", "max_tokens": 5})
                    two = await http.post(f"{url}/v1/completions", json={"prompt": "a", "n": 2})
                    huge = await http.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 999})
                    bad = await http.post(f"{url}/v1/chat/completions", json={"messages": []})
                    listed = await http.get(f"{url}/v1/models")
                    return [completion, chat, whole, two, huge, bad, listed]

            completion, chat, whole, two, huge, bad, listed = asyncio.run(talk())
            target = Target("transformers", url, tiny_llama.name)
            config = sweep_config(
                concurrency=(2,), requests_per_user=1, warmup=0, workload=resolve_workload("short", 0.1)
            )
            outcome = run_sweep([target], config, builder(), Recorder())
    finally:
        backend.close()
    assert completion.error is None and completion.usage_completion_tokens == 12 and completion.chunk_times
    assert completion.usage_prompt_tokens > 3
    assert chat.error is None and chat.usage_completion_tokens == 8
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] <= 5
    assert two.status_code == 400 and two.json()["error"]["param"] == "n"
    assert huge.status_code == 400 and "max_tokens" in huge.json()["error"]["message"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert listed.json()["data"][0]["id"] == tiny_llama.name
    results = outcome.measurements[0].requests
    assert [r.ok for r in results] == [True, True] and {r.output_tokens for r in results} == {30}


def test_transformers_peer_starts_serves_and_stops(tiny_llama: Path, tmp_path: Path) -> None:
    notes: list[str] = []
    with peers.running_peers(
        [peers.Peer.TRANSFORMERS], tiny_llama, 1, "float32", 256, tmp_path, 120, notes.append
    ) as up:
        (peer,) = up
        listed = httpx.get(f"{peer.base_url}/v1/models", timeout=10).json()
        assert listed["data"][0]["id"] == tiny_llama.name
    assert any("ready" in note for note in notes)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{peer.base_url}/health", timeout=5)
    bad_model = tmp_path / "weights.txt"
    bad_model.write_text("not a model")
    with pytest.raises(peers.PeerStartError, match="give a .gguf file"):
        with peers.running_peers([peers.Peer.TRANSFORMERS], bad_model, 1, "float32", 256, tmp_path, 60, notes.append):
            pass


def test_speculation_rows_carry_loop_metric_and_verdict() -> None:
    """`bench --speculation` on stub engines: the repeated-8-gram metric, the row fields, the computed verdict."""
    from types import SimpleNamespace

    from metronome.bench.decode import measure_speculation, repeated_ngram_fraction, speculation_markdown
    from metronome.engine.request import SpecStats, Timings

    assert repeated_ngram_fraction(list(range(50))) == 0.0
    assert repeated_ngram_fraction([1, 2, 3] * 10) == pytest.approx(20 / 23)  # 23 8-grams, the first 3 new
    assert repeated_ngram_fraction([5] * 7) == 0.0  # shorter than one 8-gram

    class StubEngine:
        def __init__(self, seconds: float, drafts: bool) -> None:
            self.seconds, self.drafts, self.spec, self.seen = seconds, drafts, SpecStats(), []

        def generate(self, messages: list, params: object) -> SimpleNamespace:
            self.seen.append(params)
            ids = (1, 2, 3) * 20 if "loop" in messages[0]["content"] else tuple(range(40))
            if self.drafts:
                self.spec.steps, self.spec.drafted, self.spec.accepted = (
                    self.spec.steps + 10,
                    self.spec.drafted + 40,
                    self.spec.accepted + 20,
                )
            return SimpleNamespace(
                token_ids=ids, finish_reason="stop", timings=Timings(0.0, 0.0, 1.0, None, 1.0 + self.seconds)
            )

    plain, spec = StubEngine(0.2, False), StubEngine(0.1, True)
    workloads = (("copy", "copy this", True), ("loop", "a loop", False))
    results = measure_speculation(
        None, 1, tokens=100, runs=2, spec_tokens=4, workloads=workloads, engines={0: plain, 4: spec}
    )
    assert [(r.workload, r.sampling) for r in results] == [
        ("copy", "greedy"),
        ("copy", "T=0.8, seeded"),
        ("loop", "greedy"),
        ("loop", "T=0.8, seeded"),
    ]
    row = results[0].row()
    assert {
        "plain_tokens_per_s",
        "spec_tokens_per_s",
        "speedup",
        "acceptance",
        "tokens_per_step",
        "mean_tokens",
        "identical",
        "repeated_8grams",
    } <= set(row)
    assert row["speedup"] == pytest.approx(2.0) and row["acceptance"] == pytest.approx(0.5)
    assert row["tokens_per_step"] == pytest.approx(3.0) and row["mean_tokens"] == 40 and row["identical"]
    assert row["repeated_8grams"] == 0.0 and results[2].repeated_8grams == pytest.approx(50 / 53)
    assert not any(p.ignore_eos for p in plain.seen)  # outputs end on their own
    sampled = [p for p in plain.seen if p.temperature > 0]
    assert (
        sampled and all(p.seed is not None for p in sampled) and all(p.max_tokens == 100 for p in plain.seen[1:])
    )  # [0]: warm-up
    table = speculation_markdown(results, 4, "prompt lookup")
    assert "repeated 8-grams" in table and "| copy | greedy | yes | 40 | 2/2 |" in table
    assert "Speculation paid (>= 1.05x) on 4 of 4 rows" in table and "Loops (> 50% repeated 8-grams)" in table
    assert "| 50% of 80 | 3.00 |" in table
    # a drafter that never drafted (paused throughout) is not "0% accepted", which reads as all rejected
    idle = measure_speculation(
        None,
        1,
        tokens=100,
        runs=2,
        spec_tokens=4,
        workloads=workloads[:1],
        engines={0: plain, 4: StubEngine(0.1, False)},
    )
    assert idle[0].drafted == 0 and "| none drafted | – |" in speculation_markdown(idle, 4, "prompt lookup")


def _sweep_against_peer(
    peer: peers.Peer, model: Path, tmp_path: Path, context: int, users: int = 2
) -> tuple[list, list[str]]:
    """Start `peer` for real on 127.0.0.1, run 2 short streamed requests through the bench runner (from
    `users` concurrent users), stop it."""
    notes: list[str] = []
    with peers.running_peers([peer], model, 1, "float32", context, tmp_path, 180, notes.append) as up:
        (running,) = up
        target = Target(peer.value, running.base_url, model.name)
        config = sweep_config(
            concurrency=(users,), requests_per_user=2 // users, warmup=0, workload=resolve_workload("short", 0.1)
        )
        outcome = run_sweep([target], config, builder(), Recorder())
    with pytest.raises(httpx.ConnectError):  # stopped on exit
        httpx.get(f"{running.base_url}/v1/models", timeout=5)
    return outcome.measurements[0].requests, notes


def _assert_sane(results: list, sources: tuple[str, ...] = ("usage",)) -> None:
    assert len(results) == 2
    for r in results:
        assert r.ok, r.error
        assert r.output_tokens == r.requested_output_tokens == 30 and r.output_tokens_source in sources
        assert r.input_tokens > 0 and r.chunks >= 2
        assert 0 < r.ttft_s < r.total_s and r.output_speed_tps > 0


def test_metronome_peer_serves_a_real_sweep(tiny_llama: Path, tmp_path: Path) -> None:
    results, notes = _sweep_against_peer(peers.Peer.METRONOME, tiny_llama, tmp_path, 256)
    assert any("metronome ready" in note for note in notes)
    _assert_sane(results)


def test_llama_cpp_peer_serves_a_real_sweep(smollm_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    # one user: llama-cpp-python's server runs one request at a time, and at 2 concurrent streams it sends one
    # of them back nearly empty (1 token, no usage)
    results, notes = _sweep_against_peer(peers.Peer.LLAMA_CPP, smollm_path, tmp_path, 512, users=1)
    assert any("llama.cpp ready" in note for note in notes)
    _assert_sane(results, sources=("usage", "chunks"))  # its streams carry no usage: tokens counted by chunks


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--load", "1", "--output-tokens", "0"], "--output-tokens must be at least 1"),  # it became 200
        (["--decode-only", "--output-tokens", "0"], "--output-tokens must be at least 1"),  # it became 128
        (["--load", "1", "--url", "http://127.0.0.1:9"], "--load runs the plan in process"),  # --url was ignored
        (["--load", "1", "--out", "x"], "--load prints its tables and writes no files"),
        (["--fuzz", "0"], "--fuzz must be at least 1"),  # schemathesis's own complaint, and exit 1
        (["--fuzz", "2", "--soak", "10s"], "--soak and --fuzz are separate runs"),  # --soak was dropped
        (["--url", "http://127.0.0.1:9", "--request-timeout", "0"], "--request-timeout must be a positive number"),
        (["--url", "http://127.0.0.1:9", "--request-timeout", "inf"], "--request-timeout must be a positive number"),
        (["--model", "m.gguf", "--threads", "0"], "--threads must be at least 1"),  # before a peer is started
        ([], "give --url URL or --model PATH"),  # a sweep needs a server
        (["--soak", "5s", "--startup-timeout", "nan"], "--startup-timeout must be a positive number"),  # "nan s"
        (["--url", "http://127.0.0.1:9", "--temperature", "nan"], "--temperature must be in [0, 2]"),  # JSON's error
        (["--url", "http://127.0.0.1:9", "--temperature", "5"], "--temperature must be in [0, 2]"),  # all 400s
        (["--decode-only", "--threads", "0"], "(check --threads)"),  # the setting's message without its flag
        # both token counts set the workload: the preset and scale were dropped while the report named the scale
        (
            ["--url", "http://127.0.0.1:9", "--input-tokens", "5", "--output-tokens", "5", "--scale", "0.5"],
            "--scale would",
        ),
        (
            ["--url", "http://127.0.0.1:9", "--input-tokens", "5", "--output-tokens", "5", "--workload", "short"],
            "--workload",
        ),
    ],
)
def test_options_a_mode_cannot_honour_are_refused_before_it_runs(argv, says, capsys) -> None:
    assert cli.main(argv) == 2
    assert says in " ".join(capsys.readouterr().err.split())  # rich wraps long lines


@pytest.mark.parametrize("mode", [[], ["--voice"], ["--fuzz", "2"]])
def test_out_that_cannot_be_a_folder_is_refused_before_the_run(tmp_path: Path, capsys, mode) -> None:
    """It was found when the files were written, after the whole run, by a FileExistsError or
    NotADirectoryError traceback, and every measurement was lost."""
    taken = tmp_path / "afile"
    taken.write_text("")
    for out in (taken, taken / "sub"):
        assert cli.main(["--url", "http://127.0.0.1:9", *mode, "--out", str(out)]) == 2
        assert f"--out {out}: cannot make this folder" in " ".join(capsys.readouterr().err.split())


def test_the_speculation_verdict_judges_rows_as_they_are_printed() -> None:
    """A row printed "1.05x" (1.0498) was listed as break-even under a line that says paid means >= 1.05x."""
    from metronome.bench.decode import SpecResult, speculation_verdict

    def row(speedup: float) -> SpecResult:
        return SpecResult(
            "code edit", "greedy", True, 3, 100.0, 0, 80.0, 80.0 * speedup, speedup, 0.8, 2.5, 0.1, True, 90
        )

    said = speculation_verdict([row(1.0498), row(0.9549)])
    assert "paid (>= 1.05x) on 1 of 2 rows: code edit (greedy, 1.05x" in said
    assert "It cost (<= 0.95x) on 1: code edit (greedy, 0.95x" in said and "Break-even" not in said

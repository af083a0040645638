"""The bench's figures from hand-built traces, requests and levels (no server, no model): every expected value
below is worked out by hand from the definitions in metrics.py, report.py and load.py."""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace

import pytest
from helpers.sweeps import sweep_config

from metronome.bench import load as bench_load
from metronome.bench.metrics import RequestResult, StreamTrace, Window, derive_result, summarize
from metronome.bench.report import Environment, build_report, render_markdown, report_json
from metronome.bench.runner import Measurement, SweepConfig, SweepOutcome, Target

ARGS = dict(key="k", user=0, seq=0, started_s=0.0, requested_output_tokens=120, prompt_tokens=10)
ARGS |= dict(prompt_counted_by="usage", prompt_chars=40)


def trace(times: list[float], tokens: int | None = None) -> StreamTrace:
    return StreamTrace(tuple(times), (" w",) * len(times), times[-1] + 0.01, 10, tokens)


# ---- one request ---------------------------------------------------------------------------------------------


def test_e2e_100_is_the_chunk_holding_the_100th_token():
    # one token a chunk, 10 ms apart from 0.5 s: token 100 is chunk 99, at 0.5 + 99 * 0.01 = 1.49 s
    result = derive_result(trace([0.5 + 0.01 * i for i in range(120)], 120), **ARGS)
    assert result.e2e_100_s == pytest.approx(1.49, rel=1e-9) and not result.e2e_100_projected


def test_exactly_100_tokens_are_measured_not_projected():
    # 100 tokens in 25 chunks of 4, 40 ms apart: token 100 rides in the last chunk, at 0.5 + 24 * 0.04 = 1.46 s;
    # a projection would have said 0.5 + 99 / (96 / 0.96) = 1.49 s
    result = derive_result(trace([0.5 + 0.04 * i for i in range(25)], 100), **ARGS)
    assert result.e2e_100_s == pytest.approx(1.46, rel=1e-9)
    assert result.e2e_100_projected is False


def test_a_short_answers_e2e_100_is_ttft_plus_99_gaps():
    # 10 tokens, one a chunk, 0.1 s apart: 9 tokens after the first over 0.9 s is 10 tok/s, and the 100th token
    # would come 99 gaps after the first: 0.5 + 99 / 10 = 10.4 s
    result = derive_result(trace([0.5 + 0.1 * i for i in range(10)], 10), **ARGS)
    assert result.output_speed_tps == pytest.approx(10.0, rel=1e-9)
    assert result.e2e_100_s == pytest.approx(10.4, rel=1e-9) and result.e2e_100_projected


def test_one_token_split_over_two_chunks_has_no_speed():
    # a single token has no token after the first: no speed (a 0 tok/s would drag every percentile down)
    result = derive_result(trace([0.5, 0.6], 1), **ARGS)
    assert result.ok and result.output_speed_tps is None and result.e2e_100_s is None


# ---- a measurement -------------------------------------------------------------------------------------------


def request(tokens: int, ok: bool = True, ttft: float = 0.5) -> RequestResult:
    return RequestResult(
        key="k",
        user=0,
        seq=0,
        started_s=0.0,
        ok=ok,
        error_kind=None if ok else "dropped",
        error=None if ok else "cut off",
        total_s=2.0,
        ttft_s=ttft if ok else None,
        output_speed_tps=50.0 if ok else None,
        first_sentence_s=None,
        e2e_100_s=None,
        e2e_100_projected=False,
        chunks=tokens,
        output_tokens=tokens,
        output_tokens_source="usage",
        requested_output_tokens=100,
        input_tokens=10,
        input_tokens_source="usage",
        prompt_chars=40,
    )


def test_rates_count_the_successful_requests_and_pool_the_rounds():
    # round 1: 2 s, 100 + 50 tokens served and a request cut off after 60; round 2: 3 s, 90 tokens
    rounds = [
        Window(2.0, (request(100), request(50), request(60, ok=False))),
        Window(3.0, (request(90),)),
    ]
    s = summarize("t", 1, rounds)
    assert (s.requests, s.ok, s.errors) == (4, 3, 1)
    assert s.output_tokens_per_s == pytest.approx(240 / 5.0)  # the cut-off stream's 60 tokens left out
    assert s.requests_per_s == pytest.approx(3 / 5.0)
    assert s.output_tokens_per_s_by_round == pytest.approx((150 / 2.0, 90 / 3.0))
    assert s.short_outputs == 2  # 50 and 90 of the 100 asked for; 100 is not short


# ---- the report ----------------------------------------------------------------------------------------------


def config(concurrency: tuple[int, ...]) -> SweepConfig:
    return sweep_config(concurrency=concurrency, requests_per_user=1, warmup=0)


def measurement(target: str, concurrency: int, ttft: float, wall: float) -> Measurement:
    # two requests, their TTFTs ttft and 3 x ttft: the p50 is 2 x ttft (the p90 2.8 x)
    return Measurement(
        target, concurrency, 0, 0.0, wall, True, (), (request(100, ttft=ttft), request(100, ttft=3 * ttft))
    )


def report(names: list[str]):
    # at concurrency 1 and 2, each target's TTFT and wall time; the ratios hold each to the baseline's at
    # the same concurrency
    figures = {("a", 1): (0.2, 2.0), ("a", 2): (0.4, 4.0), ("b", 1): (0.6, 1.0), ("b", 2): (1.6, 5.0)}
    measurements = tuple(measurement(n, c, *figures[(n, c)]) for c in (1, 2) for n in ("a", "b"))
    targets = [Target(n, "http://127.0.0.1:1", "m") for n in names]
    return build_report(SweepOutcome(measurements, False), config((1, 2)), targets, Environment.here(None), "x", 0, 1)


def test_without_metronome_the_first_target_is_the_baseline_at_each_concurrency():
    r = report(["a", "b"])
    assert r.baseline == "a"
    doc = report_json(r)
    b = {s["concurrency"]: s["ratio_to_baseline"] for s in doc["summaries"] if s["target"] == "b"}
    assert b[1]["ttft_s.p50"] == pytest.approx(0.6 / 0.2)
    assert b[2]["ttft_s.p50"] == pytest.approx(1.6 / 0.4)  # against a at 2 users, not at 1
    assert b[2]["output_tokens_per_s"] == pytest.approx((200 / 5.0) / (200 / 4.0))
    assert report(["b", "a"]).baseline == "b"


def test_the_markdown_row_shows_each_columns_own_figure():
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
        for line in render_markdown(report(["a", "b"])).splitlines()
        if line.startswith("| 2 |")
    }
    # TTFT, speed, first sentence, e2e 100, total, req/s, aggregate tok/s, errors
    assert rows[("2", "a")] == ["0.800", "50.0", "–", "–", "2.000", "0.500", "50.0", "0/2"]
    assert rows[("2", "b")] == [
        "3.200 (4.00×)",
        "50.0 (1.00×)",
        "–",
        "–",
        "2.000 (1.00×)",
        "0.400 (0.80×)",
        "40.0 (0.80×)",
        "0/2",
    ]


# ---- bench --load ----------------------------------------------------------------------------------------------


def level(where: str, per_user: float, predicted: float, compiled: float, ttft: float) -> bench_load.LevelResult:
    return bench_load.LevelResult(where, 2, 40.0, per_user, predicted, compiled, ttft, float("nan"))


def test_load_table_holds_per_user_to_the_step_timed_before_and_takes_the_median_ratio():
    row = bench_load.table([level("served", 30.0, 40.0, 60.0, 120.0)], {2: [0.6, 0.5, 0.9]})
    cells = [c.strip() for c in row.splitlines()[-1].split("|")[1:-1]]
    assert cells == [
        "served",
        "2",
        "40.0",
        "30.0",
        "40.0",
        "0.75",
        "-",
        "-",
        "60.0",
        "120",
        "-",
        "0.60 (0.60, 0.50, 0.90)",
    ]


def test_a_levels_rounds_are_medians_of_each_figure():
    runs = [level("in process", u, p, c, t) for u, p, c, t in ((10, 30, 50, 90), (30, 10, 70, 30), (20, 20, 60, 60))]
    med = bench_load.median_level(runs)
    assert (med.per_user_tps, med.predicted_tps, med.compiled_tps, med.ttft_ms) == (20, 20, 60, 60)


def test_served_per_user_speed_counts_the_tokens_after_the_first(monkeypatch):
    # (event stamps, tokens from usage, TTFT ms) of three users
    runs = [
        bench_load.ServedStream([0.0, 0.1, 0.2, 0.5], 10, 30.0, 12.0),
        bench_load.ServedStream([1.0, 2.0], 5, 50.0),  # promised nothing: it waited for a slot
        bench_load.ServedStream([0.0, 1.0], 3, 40.0, 20.0),
    ]

    async def served(url, prompts, output_tokens):
        return runs

    monkeypatch.setattr(bench_load, "_served_level", served)
    monkeypatch.setattr(bench_load, "_scrape", lambda url: {})
    got, _ = bench_load.run_served("http://127.0.0.1:1", 3, 10, 12.0, 15.0)
    # 9 / 0.5 = 18, 4 / 1 = 4, 2 / 1 = 2: the median is 4; TTFT: the median of 30, 50, 40
    assert (got.per_user_tps, got.ttft_ms, got.predicted_tps, got.compiled_tps) == (4.0, 40.0, 12.0, 15.0)
    assert got.predicted_ttft_ms == 16.0  # the median of the promises made (12 and 20)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_in_process_per_user_speed_and_ttft(monkeypatch):
    """Two users on a fake engine whose callbacks run at set times: user 0 gets 3 tokens from 1.0 s to 2.0 s,
    user 1 gets 5 from 1.0 s to 2.0 s; their first tokens come 50 and 150 ms after submit."""
    clock = _Clock()
    monkeypatch.setattr(bench_load, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(bench_load, "step_ms_now", lambda engine, live, position: 25.0)
    monkeypatch.setattr(bench_load, "cpu_seconds_by_thread", lambda thread_id: {})
    schedule = {0: [1.0, 1.5, 2.0], 1: [1.0, 1.25, 1.5, 1.75, 2.0]}
    first_after = {0: 0.05, 1: 0.15}

    class Engine:
        thread_id = threading.get_ident()
        profile = SimpleNamespace(reset=lambda: None, snapshot=lambda: SimpleNamespace(table=lambda: "profile"))
        plan = SimpleNamespace(report=SimpleNamespace(tokens_per_s=lambda users, position: 33.0))
        pace = SimpleNamespace(factor=1.0, steps=0)

        def __init__(self) -> None:
            self.submitted = 0

        def encode_prompt(self, text: str) -> list[int]:
            return [1, 2, 3]

        def submit(self, prompt, params, callback):
            i = self.submitted
            self.submitted += 1
            for k, t in enumerate(schedule[i]):
                clock.now = t
                callback(SimpleNamespace(choices=[None], finish_reason="length" if k == len(schedule[i]) - 1 else None))
            clock.now = 2.0
            timings = SimpleNamespace(submitted=10.0, first_token=10.0 + first_after[i])
            return SimpleNamespace(timings=timings, predicted_ttft_ms=70.0 + 20 * i, promised_tps=float("nan"))

    got, _ = bench_load.run_in_process(Engine(), 2, 5)
    # per user: (3 - 1) / 1 s = 2 and (5 - 1) / 1 s = 4, median 3; TTFT: median of 50 and 150 ms
    assert got.per_user_tps == pytest.approx(3.0)
    assert got.ttft_ms == pytest.approx(100.0)
    assert got.predicted_ttft_ms == pytest.approx(80.0)
    assert (got.predicted_tps, got.compiled_tps) == (pytest.approx(1000 / 25.0), 33.0)


def test_served_over_in_process_is_taken_per_round(monkeypatch, capsys):
    """Each round's served per-user speed over that round's in-process one: 8 / 10 and 10 / 20."""
    in_process = iter([level("in process", 10.0, 50.0, 50.0, 10.0), level("in process", 20.0, 50.0, 50.0, 10.0)])
    served = iter([level("served", 8.0, 50.0, 50.0, 10.0), level("served", 10.0, 50.0, 50.0, 10.0)])
    report = SimpleNamespace(step_ms={2: 20.0}, prompt_row_ms=1.0, prefill_row_ms=1.0)
    engine = SimpleNamespace(plan=SimpleNamespace(report=report), start=lambda: None, stop=lambda: None)
    proc = SimpleNamespace(terminate=lambda: None, wait=lambda timeout: 0)
    monkeypatch.setattr("metronome.engine.Engine.from_model", lambda *a, **k: engine)
    monkeypatch.setattr(bench_load, "start_server", lambda model, extra: (proc, "http://127.0.0.1:1"))
    monkeypatch.setattr(bench_load, "run_in_process", lambda *a: (next(in_process), ""))
    monkeypatch.setattr(bench_load, "run_served", lambda *a: (next(served), ""))
    monkeypatch.setattr(bench_load, "step_ms_now", lambda *a: 20.0)
    monkeypatch.setattr(bench_load, "_prompts", lambda *a: [[1, 2]] * 2)
    from metronome.config import EngineConfig

    assert bench_load.main("m", EngineConfig(slots=2), [2], 8, served=True, stall=False, rounds=2) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| served |"))
    assert row.rstrip(" |").endswith("0.65 (0.80, 0.50)")


def test_load_table_shows_the_served_ratio_on_served_rows_only_as_the_median_of_its_rounds():
    in_process = bench_load.LevelResult("in process", 2, 40.0, 30.0, 40.0, 60.0, 120.0, 80.4)
    rows = bench_load.table([in_process, level("served", 30.0, 40.0, 60.0, 120.0)], {2: [0.5, 0.9, 0.6]})
    first, second = ([c.strip() for c in line.split("|")[1:-1]] for line in rows.splitlines()[2:])
    assert first[-2:] == ["80", ""]  # the engine's TTFT prediction; no served ratio on an in-process row
    assert second[-2:] == ["-", "0.60 (0.50, 0.90, 0.60)"]


def test_the_load_table_holds_each_user_to_the_engine_s_speed_promise():
    """The promise the engine made with each user's first token, and per user over it; "-" where none was
    made (an uncalibrated plan)."""
    promised = bench_load.LevelResult("in process", 2, 40.0, 30.0, 40.0, 60.0, 120.0, 80.4, promised_tps=25.0)
    none = bench_load.LevelResult("served", 2, 40.0, 30.0, 40.0, 60.0, 120.0, 80.4)
    rows = bench_load.table([promised, none])
    header = [c.strip() for c in rows.splitlines()[0].split("|")[1:-1]]
    first, second = ([c.strip() for c in line.split("|")[1:-1]] for line in rows.splitlines()[2:])
    at = header.index("engine's promise → tok/s")
    assert header[at + 1] == "per user ÷ promise" and len(header) == len(first) == len(second)
    assert first[at : at + 2] == ["25.0", "1.20"] and second[at : at + 2] == ["-", "-"]


def test_a_levels_rounds_take_the_median_of_aggregate_speed_and_predicted_ttft_too():
    runs = [
        bench_load.LevelResult("in process", 2, aggregate, 1.0, 1.0, 1.0, 1.0, predicted)
        for aggregate, predicted in ((10.0, 5.0), (40.0, 9.0), (13.0, 7.0))
    ]
    med = bench_load.median_level(runs)
    assert (med.where, med.users, med.aggregate_tps, med.predicted_ttft_ms) == ("in process", 2, 13.0, 7.0)
    promised = [dataclasses.replace(r, promised_tps=p) for r, p in zip(runs, (30.0, float("nan"), 10.0))]
    assert bench_load.median_level(promised).promised_tps == 20.0  # the rounds that had a promise


def _main_stubs(monkeypatch, calls: dict):
    """main's parts as stand-ins that record what they are given."""
    report = SimpleNamespace(step_ms={2: 20.0}, prompt_row_ms=1.0, prefill_row_ms=1.0)
    engine = SimpleNamespace(
        plan=SimpleNamespace(report=report),
        start=lambda: calls["engine"].append("start"),
        stop=lambda: calls["engine"].append("stop"),
    )
    proc = SimpleNamespace(terminate=lambda: calls["proc"].append("terminate"), wait=lambda timeout: 0)
    monkeypatch.setattr("metronome.engine.Engine.from_model", lambda *a, **k: engine)
    monkeypatch.setattr(
        bench_load, "start_server", lambda model, extra: calls["server"].append((model, extra)) or (proc, "URL")
    )
    monkeypatch.setattr(bench_load, "step_ms_now", lambda e, live, position: calls["step"].append(live) or 20.0)
    monkeypatch.setattr(bench_load, "_prompts", lambda *a: [[1, 2]] * 2)
    monkeypatch.setattr(bench_load, "measure_stall", lambda e, repeats: calls["stall"].append(repeats) or {})
    return engine


def test_main_starts_the_server_with_the_engines_config_and_holds_each_round_to_its_own_prompts(monkeypatch, capsys):
    """The server gets the bench's slots, speculation, KV cache, prefill chunk and threads; every round and
    level its own salt, in process and served alike; a served level is promised 1000 / the step timed now at
    that many users (20 ms: 50 tok/s) and carries the in-process level's calibration; each row is the median of
    3 rounds (in process per user 10, 30, 20: 20), and --stall runs once with a repeat a round."""
    from metronome.config import EngineConfig

    calls = {"engine": [], "proc": [], "server": [], "step": [], "stall": [], "in": [], "served": []}
    _main_stubs(monkeypatch, calls)
    per_user = iter([10.0, 10.0, 30.0, 30.0, 20.0, 20.0])

    def in_process(engine, users, output_tokens, salt):
        calls["in"].append((users, output_tokens, salt))
        return bench_load.LevelResult("in process", users, 1.0, next(per_user), 1.0, 7.0 + users, 1.0, 1.0), ""

    def served(url, users, output_tokens, predicted, compiled, salt):
        calls["served"].append((url, users, predicted, compiled, salt))
        return level("served", 5.0, predicted, compiled, 1.0), ""

    monkeypatch.setattr(bench_load, "run_in_process", in_process)
    monkeypatch.setattr(bench_load, "run_served", served)
    config = EngineConfig(slots=2, spec_tokens=2, kv_cache="int8", prefill_chunk=8, threads=3)
    assert bench_load.main("m", config, [1, 2], 8, served=True, stall=True, rounds=3) == 0
    extra = ["--slots=2", "--spec-tokens=2", "--kv-cache=int8", "--prefill-chunk=8", "--threads=3"]
    assert calls["server"] == [("m", extra)]
    salts = [f"r{r}.u{u}." for r in (1, 2, 3) for u in (1, 2)]
    assert calls["in"] == [(u, 8, s) for u, s in zip([1, 2] * 3, salts)]
    assert calls["served"] == [("URL", u, 50.0, 7.0 + u, s) for u, s in zip([1, 2] * 3, salts)]
    assert calls["step"] == [1, 2] * 3 and calls["stall"] == [3]
    assert calls["engine"] == ["start", "stop"] and calls["proc"] == ["terminate"]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| in process |")]
    assert [cells.split("|")[4].strip() for cells in rows] == ["20.0", "20.0"]


def test_main_stops_the_engine_and_the_server_when_a_level_fails(monkeypatch):
    from metronome.config import EngineConfig

    calls = {"engine": [], "proc": [], "server": [], "step": [], "stall": []}
    _main_stubs(monkeypatch, calls)

    def fails(*args):
        raise RuntimeError("the level failed")

    monkeypatch.setattr(bench_load, "run_in_process", fails)
    with pytest.raises(RuntimeError, match="the level failed"):
        bench_load.main("m", EngineConfig(slots=2), [1], 8, served=True, stall=False)
    assert calls["engine"] == ["start", "stop"] and calls["proc"] == ["terminate"]

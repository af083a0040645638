"""`metronome bench --decode-only --live 1,3`: each level decodes that many users side by side in one engine,
and every level is held to the same memory-bound step (a step reads the weights once, whatever its rows)."""

from __future__ import annotations

import re

import pytest

from metronome.bench.decode import live_markdown, measure_decode
from metronome.engine import Engine


def test_each_level_decodes_its_users_together(tiny_hf, monkeypatch) -> None:
    batches: list[int] = []
    generate = Engine.generate

    def counting(self, prompts, params):
        batches.append(len(prompts) if isinstance(prompts[0], list) else 1)
        return generate(self, prompts, params)

    monkeypatch.setattr(Engine, "generate", counting)
    results = measure_decode(tiny_hf("llama"), threads=1, tokens=5, runs=2, ctx=64, live=(1, 3))
    # per level: a warm-up and `runs` measured calls, every one with that level's number of users
    assert batches == [1, 1, 1, 3, 3, 3]
    assert [r.live for r in results] == [1, 3]
    for r in results:
        assert len(r.runs_tokens_per_s) == len(r.runs_bandwidth) == 2 and r.tokens_per_s > 0
        assert r.weight_bytes == results[0].weight_bytes  # one plan: the same bytes per step at every level
    table = live_markdown(results)
    assert table.count("\n| 1 | ") == 1 and table.count("\n| 3 | ") == 1


def test_live_counts_must_be_positive(tiny_hf) -> None:
    with pytest.raises(ValueError, match="--live"):
        measure_decode(tiny_hf("llama"), threads=1, tokens=5, runs=1, ctx=64, live=(0, 2))


def test_a_model_shorter_than_the_bench_context_runs_in_its_own(tiny_hf) -> None:
    """The decode bench's plan asked for 1,024 tokens of context whatever the model's: a 512-token model was
    refused with 'lower --ctx', a flag bench does not have."""
    [result] = measure_decode(tiny_hf("llama"), threads=1, tokens=3, runs=1)  # the default ctx, 1,024
    assert result.tokens_per_s > 0


def test_more_output_tokens_than_the_plan_holds_are_refused_before_the_compile(tiny_hf, monkeypatch) -> None:
    """It was refused after the model had loaded and calibrated (seconds, minutes for a large model)."""

    def no_compile(*_args, **_kwargs):
        raise AssertionError("the engine was built before the refusal")

    monkeypatch.setattr(Engine, "from_model", no_compile)
    with pytest.raises(ValueError, match="--output-tokens 2000: the decode bench's plan holds 512 tokens"):
        measure_decode(tiny_hf("llama"), threads=1, tokens=2000, runs=1)  # a 512-token model


def test_the_decode_figures_in_their_units() -> None:
    """A level of 2 live slots: runs of 40, 50, 45 tokens/s (median 45, a 22.22 ms step), the plan's 20 ms
    calibration 10 % under it; TTFT median 0.2 s is "200 ms"; 100,000,000 bytes a step "100.0 MB" (1e6);
    at 10 GB/s the bound is 100 tokens/s, a 10.0 ms step, and 40/50/45 tokens/s are 40/50/45 % of it."""
    from metronome.bench.decode import DecodeResult

    r = DecodeResult(
        "m", "int4", "compact", 2, 64, (40.0, 50.0, 45.0), (0.12, 0.30, 0.2), 20.0, 100_000_000, (10e9,) * 3, 2
    )
    table = r.markdown()
    assert "| TTFT (median) | 200 ms |" in table
    assert "| 20.00 ms / 22.22 ms (measured +11%) |" in table  # 11 % slower than calibrated (it read -10%)
    assert "| weight bytes read per token | 100.0 MB |" in table
    assert "| memory-bound decode (median bandwidth) | 100 tokens/s |" in table
    assert live_markdown((r,)).endswith("\n| 2 | 45.0 | 22.2 / 20.0 | 10.0 | 10.0 | 45% (40%, 50%, 45%) |")


def test_each_level_reports_its_users_rates_and_its_own_calibration(tiny_hf, monkeypatch) -> None:
    """On a stand-in engine: a user's rate is its tokens after the first over the time after the first token
    (11 tokens in 2 s: 5 tokens/s; 21 in 2 s: 10), the level's the median of its users'; TTFT the median
    of its users' (0.1, 0.3, 0.5 s: 0.3); the calibrated step is the level's own (step_ms[3], not [1]);
    --kv-cache reaches the plan."""
    from types import SimpleNamespace

    import metronome.fleet.machine
    from metronome.engine.request import Timings

    configs = []

    class Stub:
        model_name = "stub"
        plan = SimpleNamespace(
            report=SimpleNamespace(weights="int8", decode_mode="rows", weight_bytes=10**6, step_ms={1: 4.0, 3: 9.0})
        )

        def encode_prompt(self, text, chat):
            return [1, 2, 3]

        def generate(self, prompts, params):
            users = [(11, 0.1), (21, 0.3), (21, 0.5)][: len(prompts)]
            return [
                SimpleNamespace(token_ids=list(range(n)), timings=Timings(0.0, 0.0, ttft, None, ttft + 2.0))
                for n, ttft in users
            ]

    def from_model(model, config, calibrate):
        configs.append(config)
        return Stub()

    monkeypatch.setattr(Engine, "from_model", from_model)
    monkeypatch.setattr(metronome.fleet.machine, "read_bandwidth", lambda threads: 1e9)
    one, three = measure_decode(tiny_hf("llama"), threads=1, tokens=5, runs=1, ctx=64, live=(1, 3), kv_cache="int8")
    assert configs[0].kv_cache == "int8" and configs[0].slots == 3
    assert (one.runs_tokens_per_s, one.ttft_s, one.predicted_step_ms) == ((5.0,), (0.1,), 4.0)
    assert (three.runs_tokens_per_s, three.ttft_s, three.predicted_step_ms) == ((10.0,), (0.3,), 9.0)


def test_output_tokens_the_plan_cannot_hold_are_refused_at_the_edge(tiny_hf, monkeypatch) -> None:
    """One output token has no decode rate (refused); as many output tokens as the 512-token model's plan
    holds leaves no position for the prompt (refused before the compile)."""

    def no_compile(*_args, **_kwargs):
        raise AssertionError("the engine was built before the refusal")

    monkeypatch.setattr(Engine, "from_model", no_compile)
    with pytest.raises(ValueError, match="--output-tokens >= 2"):
        measure_decode(tiny_hf("llama"), threads=1, tokens=1, runs=1)
    with pytest.raises(ValueError, match="--output-tokens 512: the decode bench's plan holds 512 tokens"):
        measure_decode(tiny_hf("llama"), threads=1, tokens=512, runs=1)


def test_speculation_rows_count_plain_endings_every_rounds_sameness_and_seed(monkeypatch) -> None:
    """`bench --speculation` on stand-in engines, 3 rounds: "ended" counts the plain outputs that stopped on
    their own (the speculative one runs to its length here, and must not count); "same output" needs every
    round equal (round 0 differs); a sampled round r is seeded SAMPLED_SEED + r in both engines."""
    from types import SimpleNamespace

    from metronome.bench.decode import SAMPLED_SEED, measure_speculation
    from metronome.engine.request import SpecStats, Timings

    class Stub:
        def __init__(self, finish, differ_in_round_0):
            self.finish, self.differ, self.spec, self.seeds, self.calls = finish, differ_in_round_0, SpecStats(), [], 0

        def generate(self, messages, params):
            self.calls += 1
            self.seeds.append(params.seed)
            ids = tuple(range(10))
            if self.differ and self.calls == 2:  # the warm-up, then round 0
                ids = (99,) + ids[1:]
            return SimpleNamespace(token_ids=ids, finish_reason=self.finish, timings=Timings(0.0, 0.0, 1.0, None, 2.0))

    plain, spec = Stub("stop", False), Stub("length", True)
    rows = measure_speculation(
        None, 1, tokens=50, runs=3, workloads=(("w", "text", True),), engines={0: plain, 4: spec}
    )
    greedy, sampled = rows
    assert (greedy.ended, sampled.ended) == (3, 3)
    assert (greedy.identical, sampled.identical) == (False, True)
    assert plain.seeds[-3:] == spec.seeds[-3:] == [SAMPLED_SEED, SAMPLED_SEED + 1, SAMPLED_SEED + 2]


def test_the_verdict_at_its_edges() -> None:
    """A 1.10x row with exactly one token per verify step accepted no draft: timing noise, not paid; a row of
    exactly 50 % repeated 8-grams is not a loop (more than 50 % is); drafts made and all rejected read
    "0% of 12", not "none drafted"."""
    from metronome.bench.decode import SpecResult, speculation_markdown, speculation_verdict

    def row(speedup, per_step, repeated, acceptance=0.0, drafted=12):
        return SpecResult("w", "greedy", True, 3, 100.0, 3, 80.0, 80 * speedup, speedup, acceptance, per_step,
                          repeated, True, drafted)  # fmt: skip

    said = speculation_verdict([row(1.10, 1.0, 0.5)])
    assert "paid (>= 1.05x) on none" in said and "without a single accepted draft on 1 rows" in said
    assert "Loops" not in said and "Break-even" not in said
    assert "Loops" in speculation_verdict([row(1.0, 1.0, 0.51)])
    assert "| 0% of 12 | 1.00 |" in speculation_markdown([row(1.10, 1.0, 0.5)], 4, "prompt lookup")


def test_a_prompt_and_output_one_past_the_plan_are_refused_in_bench_terms(tiny_hf, monkeypatch) -> None:
    """A 3-token prompt and 62 output tokens need 65 positions of a 64-token plan: refused, naming the 61
    the plan can give (3 + 61 = 64 exactly fits)."""
    from types import SimpleNamespace

    stub = SimpleNamespace(encode_prompt=lambda text, chat: [1, 2, 3])
    monkeypatch.setattr(Engine, "from_model", lambda *a, **k: stub)
    with pytest.raises(ValueError, match="--output-tokens 62: with its 3-token prompt .* holds at most 61"):
        measure_decode(tiny_hf("llama"), threads=1, tokens=62, runs=1, ctx=64)


def test_a_level_runs_plain_greedy_to_its_length_on_the_benchs_own_config(tiny_hf, monkeypatch) -> None:
    """On a stand-in engine: the plan is built with speculation off, the weights and threads asked for; the
    prompt is raw text (no chat template); the warm-up and the measured runs ignore EOS, the measured ones for
    all 61 tokens that a 3-token prompt leaves in a 64-token plan; the bandwidth is read with the bench's
    threads; TTFT is the median of the users' (0.1, 0.2, 0.9 s: 0.2, not their mean 0.4)."""
    from types import SimpleNamespace

    import metronome.fleet.machine
    from metronome.engine.request import Timings

    configs, prompts, params_seen, bandwidth_threads = [], [], [], []

    class Stub:
        model_name = "stub"
        plan = SimpleNamespace(
            report=SimpleNamespace(weights="int8", decode_mode="rows", weight_bytes=10**6, step_ms={3: 9.0})
        )

        def encode_prompt(self, text, chat):
            prompts.append(chat)
            return [1, 2, 3]

        def generate(self, prompts, params):
            params_seen.append(params)
            return [
                SimpleNamespace(token_ids=list(range(11)), timings=Timings(0.0, 0.0, ttft, None, ttft + 2.0))
                for ttft in (0.1, 0.2, 0.9)[: len(prompts)]
            ]

    def from_model(model, config, calibrate):
        configs.append(config)
        return Stub()

    monkeypatch.setattr(Engine, "from_model", from_model)
    monkeypatch.setattr(
        metronome.fleet.machine, "read_bandwidth", lambda threads: bandwidth_threads.append(threads) or 1e9
    )
    three, one = measure_decode(tiny_hf("llama"), threads=2, tokens=61, runs=2, ctx=64, weights="int8", live=(3, 1))
    config = configs[0]
    assert (config.slots, config.spec_tokens, config.weights, config.threads) == (3, 0, "int8", 2)
    assert prompts == [False] and bandwidth_threads == [2] * 4
    assert all(p.ignore_eos for p in params_seen)
    assert [p.max_tokens for p in params_seen] == [4, 61, 61, 4, 61, 61]  # a warm-up, then the runs, a level
    assert (three.live, three.ttft_s, three.runs_tokens_per_s) == (3, (0.2, 0.2), (5.0, 5.0))
    assert (one.live, one.ttft_s) == (1, (0.1, 0.1))


@pytest.mark.parametrize(
    "kwargs, says", [(dict(runs=0), "--rounds >= 1"), (dict(live=()), "--live ()"), (dict(live=(2, 0)), "--live")]
)
def test_no_rounds_and_no_live_levels_are_refused_before_the_compile(tiny_hf, monkeypatch, kwargs, says) -> None:
    def no_compile(*_args, **_kwargs):
        raise AssertionError("the engine was built before the refusal")

    monkeypatch.setattr(Engine, "from_model", no_compile)
    with pytest.raises(ValueError, match=re.escape(says)):
        measure_decode(tiny_hf("llama"), threads=1, **{"tokens": 5, "runs": 1, "ctx": 64, **kwargs})


class _ScriptedEngine:
    """A stand-in for `measure_speculation`: after the warm-up, each call answers the next (ids, seconds after
    the first token, finish reason) of its script, round after round; `drafts` adds 10 verify steps, 40 drafted
    and 20 accepted tokens a call."""

    def __init__(self, script, drafts: bool) -> None:
        from metronome.engine.request import SpecStats

        self.script, self.drafts, self.spec, self.seen, self.calls = script, drafts, SpecStats(), [], 0

    def generate(self, messages, params):
        from types import SimpleNamespace

        from metronome.engine.request import Timings

        self.seen.append((messages[0]["content"], params.max_tokens))
        self.calls += 1
        ids, seconds, finish = ((0, 1), 1.0, "stop") if self.calls == 1 else self.script[(self.calls - 2) % 3]
        if self.drafts:
            self.spec.steps, self.spec.drafted, self.spec.accepted = (
                self.spec.steps + 10,
                self.spec.drafted + 40,
                self.spec.accepted + 20,
            )
        return SimpleNamespace(token_ids=ids, finish_reason=finish, timings=Timings(0.0, 0.0, 1.0, None, 1.0 + seconds))


def test_speculation_rows_summarize_rounds_from_the_plain_output_and_each_rounds_ratio() -> None:
    """3 rounds. Plain: 11 tokens in 1 s, 11 in 1 s, a 41-token loop in 16 s (10, 10, 2.5 tok/s: median 10);
    speculative: 21 tokens in 2 s, the same 11 in 0.5 s, 41 other tokens in 4 s (10, 20, 10). The speed-up is
    the median of the rounds' own ratios (1, 2, 4: 2), not the ratio of the medians (1); length (11, 11, 41:
    mean 21) and repeated 8-grams (0, 0, 31 of 34: mean 31/102) are the plain output's; each row counts only
    its own drafts (3 calls of 40); of the plain outputs only the one that stopped
    ended on its own (not the one cut at its length, nor the one that ended in an error); both engines are warmed up first."""
    from metronome.bench.decode import measure_speculation

    loop = (1, 2, 3) * 13 + (1, 2)
    plain = _ScriptedEngine(
        [(tuple(range(11)), 1.0, "stop"), (tuple(range(11)), 1.0, "error"), (loop, 16.0, "length")], False
    )
    spec = _ScriptedEngine([(tuple(range(21)), 2.0, "stop"), (tuple(range(11)), 0.5, "stop"), (tuple(range(41)), 4.0, "stop")], True)  # fmt: skip
    greedy, sampled = measure_speculation(
        None, 1, tokens=50, runs=3, workloads=(("w", "text", True),), engines={0: plain, 4: spec}
    )
    assert (greedy.plain_tokens_per_s, greedy.spec_tokens_per_s) == (10.0, 10.0)
    assert greedy.speedup == pytest.approx(2.0)
    assert greedy.mean_tokens == pytest.approx(21.0) and greedy.repeated_8grams == pytest.approx(31 / 102)
    assert (greedy.ended, greedy.identical) == (1, False)  # only a stop ended on its own
    assert (greedy.drafted, sampled.drafted) == (120, 120) and greedy.tokens_per_step == pytest.approx(3.0)
    assert plain.seen[0] == spec.seen[0] == ("Hello.", 16)


def test_a_one_token_round_has_no_speed_up_and_an_idle_drafter_one_token_a_step() -> None:
    """A plain output of one token has no decode rate: no ratio is taken (not a division by zero), and a
    speed-up with no ratio at all is NaN; a drafter that never drafted emitted one token per step."""
    import math

    from metronome.bench.decode import measure_speculation

    plain = _ScriptedEngine([((7,), 1.0, "stop")] * 3, False)
    spec = _ScriptedEngine([((7,), 1.0, "stop")] * 3, False)
    (row,) = measure_speculation(
        None, 1, tokens=50, runs=1, workloads=(("w", "text", True),), engines={0: plain, 4: spec}
    )[:1]
    assert math.isnan(row.speedup) and row.tokens_per_step == 1.0 and row.drafted == 0


@pytest.mark.parametrize("kwargs", [dict(spec_tokens=0), dict(runs=0), dict(tokens=1)])
def test_speculation_without_drafts_rounds_or_a_rate_is_refused(kwargs) -> None:
    from metronome.bench.decode import measure_speculation

    with pytest.raises(ValueError, match="--speculation needs"):
        measure_speculation(None, 1, **{"tokens": 50, "runs": 1, "spec_tokens": 4, "engines": {}, **kwargs})

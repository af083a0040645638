"""The reflection loop (agents/reflect.py): its turns, the prompts that extend each other token for token,
the prefix cache serving them, the events' order, the timings' sums, and the checks of its settings;
`metronome reflect` run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.submits import recorded_submits

from metronome.agents.reflect import (
    ReflectionDone,
    ReflectSettings,
    TurnDelta,
    TurnDone,
    TurnStarted,
    check_fits,
    reflect,
    run_reflection,
)
from metronome.compile.plan import PREFIX_PAGE_TOKENS
from metronome.config import EngineConfig, ParamError, SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load

TASK = "Give one tip for writing clear code."
PARAMS = SamplingParams(max_tokens=16)


@pytest.fixture(scope="module")
def cached_engine(smollm):
    return Engine.from_model(config=EngineConfig(slots=2, ctx=512, prefix_cache_tokens=1024), loaded=smollm)


@pytest.fixture(scope="module")
def plain_engine(smollm):
    return Engine.from_model(config=EngineConfig(slots=2, ctx=512, prefix_cache_tokens=0), loaded=smollm)


@pytest.fixture(scope="module")
def recorded(cached_engine):
    """Every event of a 2-round reflection, and each turn's engine request (prompt and output ids)."""
    with recorded_submits(cached_engine) as requests:
        events = list(reflect(cached_engine, TASK, ReflectSettings(rounds=2), PARAMS))
    return events, requests


def test_turns_come_in_order_with_their_events(recorded):
    events, requests = recorded
    settings = ReflectSettings(rounds=2)
    assert len(requests) == settings.turns == 5
    kinds = [(e.round, e.kind) for e in events if isinstance(e, TurnStarted)]
    assert kinds == [(1, "answer"), (1, "critique"), (1, "revision"), (2, "critique"), (2, "revision")]
    # per turn: started, deltas, done; then one ReflectionDone, last
    turn, texts = -1, {}
    for e in events[:-1]:
        if isinstance(e, TurnStarted):
            assert e.turn == turn + 1
            turn = e.turn
            texts[turn] = ""
        elif isinstance(e, TurnDelta):
            assert e.turn == turn
            texts[turn] += e.text
        else:
            assert isinstance(e, TurnDone) and e.stats.turn == turn and e.text == texts[turn]
    done = events[-1]
    assert isinstance(done, ReflectionDone) and sum(isinstance(e, ReflectionDone) for e in events) == 1
    assert list(done.texts) == [texts[i] for i in range(5)] and done.answer == texts[4]
    assert all(t.strip() for t in done.texts)


def test_each_prompt_extends_the_last_and_is_served_from_the_cache(recorded, cached_engine):
    events, requests = recorded
    done = events[-1]
    tok = cached_engine.tokenizer
    for k in range(1, len(requests)):
        before = requests[k - 1].prompt_ids + requests[k - 1].output_ids
        assert requests[k].prompt_ids[: len(before)] == before, f"turn {k} does not extend turn {k - 1}"
        assert len(requests[k].prompt_ids) > len(before)
        stats = done.turns[k]
        assert stats.extends and stats.prompt_tokens == len(requests[k].prompt_ids)
        # the transcript up to the reply's last token (sampled, never run) is in the pool in full pages
        assert stats.cached_tokens == (len(before) - 1) // PREFIX_PAGE_TOKENS * PREFIX_PAGE_TOKENS
    assert done.turns[0].cached_tokens == 0
    # the ids stand for the conversation the chat template renders, instructions included
    messages = [{"role": "user", "content": TASK}]
    for k, (_round, kind) in enumerate(ReflectSettings(rounds=2).kinds()[1:], start=1):
        messages += [
            {"role": "assistant", "content": done.texts[k - 1]},
            {"role": "user", "content": ReflectSettings().instruction(kind)},
        ]
        assert tok.decode(requests[k].prompt_ids, skip_special=False) == tok.render_chat(messages)


def test_each_turn_gives_what_the_same_prompt_gives_uncached(recorded, plain_engine):
    events, requests = recorded
    for r, text in zip(requests, events[-1].texts):
        alone = plain_engine.generate(r.prompt_ids, PARAMS)
        assert alone.cached_tokens == 0
        assert alone.text == text and list(alone.token_ids) == r.output_ids


def test_timings_add_up(recorded):
    events, requests = recorded
    done = events[-1]
    t = done.totals
    assert t.decode_ms == pytest.approx(sum(s.decode_ms for s in done.turns))
    assert t.completion_tokens == sum(len(r.output_ids) for r in requests)
    assert t.prompt_tokens == sum(len(r.prompt_ids) for r in requests)
    assert t.cached_tokens == sum(s.cached_tokens for s in done.turns)
    # the turns run one after another inside the loop's wall time
    assert t.wall_ms >= sum(s.ttft_ms + s.decode_ms + s.build_ms for s in done.turns)
    assert t.outside_ms == pytest.approx(t.wall_ms - t.decode_ms) and 0 < t.outside_share < 1
    for s, r in zip(done.turns, requests):
        assert s.completion_tokens == len(r.output_ids) and s.finish_reason == r.finish_reason
        assert s.ttft_ms == pytest.approx((r.timings.first_token - r.timings.submitted) * 1000)
        assert s.decode_ms == pytest.approx((r.timings.finished - r.timings.first_token) * 1000)


def test_settings_are_checked_naming_the_parameter():
    for kwargs, param in (
        (dict(rounds=0), "rounds"),
        (dict(rounds=33), "rounds"),
        (dict(points=0), "points"),
        (dict(points=21), "points"),
        (dict(critique="  "), "critique"),
        (dict(revision="apply the {n} points"), "revision"),
        # a TypeError and an AttributeError traceback at format time; a gigabyte of padding
        (dict(critique="{points[0]}"), "critique"),
        (dict(critique="{points.x}"), "critique"),
        (dict(critique="{points:>999999999}"), "critique"),
    ):
        with pytest.raises(ParamError) as info:
            ReflectSettings(**kwargs)
        assert info.value.param == param, kwargs
    assert ReflectSettings(rounds=1).turns == 3 and "5" in ReflectSettings().instruction("critique")


@pytest.fixture(scope="module")
def tiny_engine(tiny_hf):
    return Engine.from_model(
        config=EngineConfig(slots=1, ctx=128, weights="f32", prefix_cache_tokens=0), loaded=load(tiny_hf("llama"))
    )


def test_a_loop_that_cannot_fit_the_context_is_refused_before_it_runs(tiny_engine):
    check_fits(tiny_engine, "the cat", ReflectSettings(rounds=1), SamplingParams(max_tokens=8))
    with pytest.raises(ParamError) as info:
        check_fits(tiny_engine, "the cat", ReflectSettings(rounds=8), SamplingParams(max_tokens=8))
    assert info.value.param == "rounds" and "128" in str(info.value)
    with pytest.raises(ParamError) as info:
        next(reflect(tiny_engine, "   ", ReflectSettings(rounds=1), SamplingParams(max_tokens=8)))
    assert info.value.param == "task"
    with pytest.raises(ParamError) as info:  # as POST /v1/reflections refuses it (it ran three empty turns)
        next(reflect(tiny_engine, "the cat", ReflectSettings(rounds=1), SamplingParams(max_tokens=0)))
    assert info.value.param == "max_tokens"
    assert tiny_engine.steps == 0  # nothing ran


def test_the_fit_check_holds_at_exactly_the_context_and_names_what_to_lower(tiny_engine, monkeypatch):
    """A loop whose worst case is exactly the context runs; one token more is refused. When even one round
    cannot fit, fewer rounds would not help: the refusal names max_tokens. A model without a chat template
    is refused by name."""
    from metronome.agents.reflect import worst_case_tokens

    one = ReflectSettings(rounds=1)
    for task in ("the cat", "the cat the", "the cat the cat"):  # a task whose base leaves a multiple of 3 turns
        base = worst_case_tokens(tiny_engine, task, one, SamplingParams(max_tokens=1)) - one.turns
        if (tiny_engine.config.ctx - base) % one.turns == 0:
            break
    exact = (tiny_engine.config.ctx - base) // one.turns
    assert worst_case_tokens(tiny_engine, task, one, SamplingParams(max_tokens=exact)) == tiny_engine.config.ctx
    check_fits(tiny_engine, task, one, SamplingParams(max_tokens=exact))
    with pytest.raises(ParamError) as info:
        check_fits(tiny_engine, task, one, SamplingParams(max_tokens=exact + 1))
    assert info.value.param == "max_tokens" and "lower max_tokens" in str(info.value)
    with pytest.raises(ParamError) as info:
        check_fits(tiny_engine, task, ReflectSettings(rounds=2), SamplingParams(max_tokens=exact))
    assert info.value.param == "rounds" and "lower rounds or max_tokens" in str(info.value)
    monkeypatch.setattr(type(tiny_engine.tokenizer), "has_chat_template", property(lambda self: False))
    with pytest.raises(ParamError) as info:
        check_fits(tiny_engine, "the cat", one, SamplingParams(max_tokens=8))
    assert info.value.param == "model"


def test_a_template_that_renders_replies_otherwise_falls_back_to_its_own_encoding(tiny_engine):
    # the tiny template writes "<|assistant|> reply </s>", not the reply's ids after "<|assistant|>"
    done = run_reflection(tiny_engine, "the cat", ReflectSettings(rounds=1), SamplingParams(max_tokens=4))
    assert [s.extends for s in done.turns] == [True, False, False]
    assert all(s.completion_tokens >= 1 for s in done.turns)


def test_closing_the_loop_cancels_its_running_turn(tiny_engine):
    """A client that leaves mid-turn (the HTTP route closes the generator): the turn's request must not go
    on generating for nobody in its slot."""
    with recorded_submits(tiny_engine) as requests:
        loop = reflect(
            tiny_engine, "the cat", ReflectSettings(rounds=1), SamplingParams(max_tokens=24, ignore_eos=True)
        )
        next(e for e in loop if isinstance(e, TurnDelta))
        loop.close()
    tiny_engine.step()
    assert len(requests) == 1 and requests[0].finish_reason == "cancelled"
    assert tiny_engine.scheduler.idle


def test_a_turn_the_engine_fails_ends_the_loop_with_the_error(tiny_hf, monkeypatch):
    """With the engine on its own thread a failed step is an "error" event, not an exception here: the
    loop must stop with it, not take the cut turn as an answer and go on."""
    engine = Engine.from_model(
        config=EngineConfig(slots=1, ctx=128, prefix_cache_tokens=0), loaded=load(tiny_hf("llama"))
    )
    engine.start()
    try:
        monkeypatch.setattr(engine.plan, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated")))
        with pytest.raises(RuntimeError, match=r"failed during turn 0 \(answer\).*simulated"):
            run_reflection(engine, "the cat", ReflectSettings(rounds=1), SamplingParams(max_tokens=4))
    finally:
        engine.stop()


def test_the_system_message_opens_the_first_prompt(tiny_engine):
    prompts = []
    for system in (None, "the dog"):
        with recorded_submits(tiny_engine) as requests:
            run_reflection(
                tiny_engine, "the cat", ReflectSettings(rounds=1, system=system), SamplingParams(max_tokens=2)
            )
        prompts.append(tiny_engine.tokenizer.decode(requests[0].prompt_ids, skip_special=False))
    assert "the dog" not in prompts[0] and "the dog" in prompts[1], prompts


def test_a_turns_speed_counts_the_tokens_after_the_first():
    from metronome.agents.reflect import TurnStats

    stats = TurnStats(1, 0, "answer", 10, 0, True, 5, "length", 0.0, 1.0, 1000.0, 0.0)
    assert stats.tokens_per_s == 4.0  # 4 tokens in the second after the first one


def _metronome(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metronome.cli", *args], capture_output=True, text=True, timeout=300)


def test_metronome_reflect_streams_each_turn_and_reports_timings(tiny_hf):
    model = str(tiny_hf("llama"))
    flags = ("--model", model, "--weights", "f32", "--ctx", "128", "--max-tokens", "4", "--rounds", "1")
    out = _metronome("reflect", "the cat", *flags)
    assert out.returncode == 0, out.stderr
    engine = Engine.from_model(config=EngineConfig(ctx=128, weights="f32"), loaded=load(model))
    done = run_reflection(engine, "the cat", ReflectSettings(rounds=1), SamplingParams(max_tokens=4))
    expected = "".join(f"## round {s.round} · {s.kind}\n{text}\n\n" for s, text in zip(done.turns, done.texts))
    assert out.stdout == expected
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 4 and all("TTFT" in line and "cached" in line for line in lines[:3])
    assert "3 turns" in lines[3] and "outside decoding" in lines[3]
    bad = _metronome("reflect", "the cat", *flags[:-1], "0")
    assert bad.returncode == 2 and "--rounds" in bad.stderr and "rounds=0" in bad.stderr
    too_many = _metronome("reflect", "the cat", *flags[:-2], "--rounds", "20")
    assert too_many.returncode == 2 and "context" in too_many.stderr and "--rounds" in too_many.stderr


def test_each_turn_gets_its_own_instruction_and_an_instant_loop_has_no_share():
    """The critique turn asks for the points and the revision applies them (swapped, each turn asked the
    other's question); a loop timed at 0 ms reports no share of time outside decoding, not a ZeroDivisionError."""
    import math

    from metronome.agents.reflect import DEFAULT_CRITIQUE, DEFAULT_REVISION, ReflectionTotals

    own = ReflectSettings(points=2, critique="Name {points} flaws.", revision="Fix those {points}.")
    assert (own.instruction("critique"), own.instruction("revision")) == ("Name 2 flaws.", "Fix those 2.")
    default = ReflectSettings()
    assert default.instruction("critique") == DEFAULT_CRITIQUE.format(points=5)
    assert default.instruction("revision") == DEFAULT_REVISION.format(points=5)
    assert math.isnan(ReflectionTotals(0.0, 0.0, 0, 0, 0).outside_share)


class _CharTokenizer:
    """A stand-in tokenizer: one id per character, and 1 as the BOS it adds (as Llama's and Gemma's do)."""

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([1] if add_bos else []) + [ord(c) for c in text]


def test_the_first_prompt_is_encoded_whole_with_its_bos_and_later_ones_extend_it():
    """The first turn encodes the rendered chat as a prompt (BOS included); the next appends only the new
    text's ids (no BOS in the middle) after the reply's ids."""
    from types import SimpleNamespace

    from metronome.agents.reflect import _next_prompt, _Transcript

    engine = SimpleNamespace(tokenizer=_CharTokenizer())
    transcript = _Transcript([{"role": "user", "content": "hi"}])
    assert _next_prompt(engine, transcript, None) is True
    assert transcript.ids == [1, *map(ord, "<user>hi")] and transcript.text == "<user>hi"
    reply = [ord(c) for c in "<assistant>yo"]
    transcript.messages.append({"role": "assistant", "content": "yo"})
    transcript.ids, transcript.text = transcript.ids + reply, transcript.text + "<assistant>yo"
    assert _next_prompt(engine, transcript, "again") is True
    assert transcript.ids == [1, *map(ord, "<user>hi<assistant>yo<user>again")]


def test_the_watch_hears_each_turn_with_its_gaps_and_a_closed_loop_as_cancelled(tiny_engine):
    """TurnWatch (the server's metrics): one gap per token after the first, and a turn the loop's closing
    cut is reported "cancelled", not as an ordinary end. Each turn's queue time runs to its admission."""
    from metronome.agents.reflect import TurnWatch

    submitted: list = []
    ended: list[tuple] = []
    watch = TurnWatch(submitted.append, lambda r, reason, gaps: ended.append((r, reason, len(gaps))))
    run = list(reflect(tiny_engine, "the cat", ReflectSettings(rounds=1), SamplingParams(max_tokens=4), watch))
    assert isinstance(run[-1], ReflectionDone) and len(submitted) == 3
    assert ended == [(r, r.finish_reason, len(r.output_ids) - 1) for r in submitted]
    for stats, r in zip(run[-1].turns, submitted):  # queued from its submit until a slot took it
        assert r.timings.admitted > r.timings.submitted
        assert stats.queue_ms == pytest.approx((r.timings.admitted - r.timings.submitted) * 1000)
    submitted.clear()
    ended.clear()
    loop = reflect(
        tiny_engine, "the cat", ReflectSettings(rounds=1), SamplingParams(max_tokens=24, ignore_eos=True), watch
    )
    next(e for e in loop if isinstance(e, TurnDelta))
    loop.close()
    tiny_engine.step()
    assert [reason for _r, reason, _n in ended] == ["cancelled"] and submitted[0].finish_reason == "cancelled"


def test_a_turn_that_ended_before_its_first_token_has_stats_not_a_crash():
    """A request ended before any token (never admitted, no first token) still has its stats: its wait up
    to its end counts as time to first token, and it decoded for 0 ms."""
    from types import SimpleNamespace

    from metronome.agents.reflect import _stats

    timings = SimpleNamespace(submitted=1.0, admitted=None, first_token=None, finished=1.25)
    r = SimpleNamespace(timings=timings, prompt_ids=[5, 6], cached_tokens=0, output_ids=[], finish_reason=None)
    stats = _stats(r, 1, 0, "answer", True, 0.0)
    assert (stats.queue_ms, stats.ttft_ms, stats.decode_ms) == (0.0, 250.0, 0.0)
    assert stats.finish_reason == "error" and stats.completion_tokens == 0

"""The TTFT a request is promised at submit, on a real engine with a known calibration: requests that
arrive together mostly arrive while a step runs, and that step's rows are already chosen."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from helpers.slow_plan import slowed_plan

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load

ONE = SamplingParams(max_tokens=2, ignore_eos=True)


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(5, vocab, (n - 1,), generator=g).tolist()


def test_a_request_that_arrives_during_a_step_waits_for_it_and_then_runs_beside_its_decode_rows(tiny_hf):
    # a set chunk of 32 rows: the new prompt's 10 rows run in one step beside the decode row (the plan's own
    # choice, a step within 2.5 four-row steps here, would take 9 of them)
    config = EngineConfig(slots=4, ctx=128, spec_tokens=0, prefill_chunk=32)
    engine = Engine.from_model(config=config, loaded=load(tiny_hf("llama")))
    assert engine.plan.runner.any_rows, "the fused runner mixes prompt and decode rows"
    # a known price: a one-row step 4 ms, a prompt row 1.5 ms beside decode rows and 1 ms alone
    engine.plan.report = dataclasses.replace(
        engine.plan.report, step_ms={1: 4.0, 2: 5.0, 3: 6.0, 4: 7.0}, prompt_row_ms=1.5, prefill_row_ms=1.0
    )
    vocab = engine.plan.cfg.vocab_size
    first = engine.submit(_prompt(1, 20, vocab), ONE)
    arrived = []
    decode = engine.plan.decode

    def arrive_during_the_first_call(*args, **kwargs):
        if not arrived:
            arrived.append(engine.submit(_prompt(2, 10, vocab), ONE))
        return decode(*args, **kwargs)

    engine.plan.decode = arrive_during_the_first_call
    try:
        while first.finish_reason is None or arrived[0].finish_reason is None:
            engine.step()
    finally:
        del engine.plan.decode
    # the step in flight runs the first prompt alone (4 + 20 x 1 ms); then the first request decodes and
    # the new prompt's 10 rows run beside it (4 + 10 x 1.5 ms). Priced as if it had arrived before that
    # step, both prompts would share one step alone: 4 + 30 x 1 = 34 ms.
    expected = (4.0 + 20 * 1.0) + (4.0 + 10 * 1.5)
    # less the time the step had run when the request arrived (microseconds; a loaded machine may pause)
    assert expected - 5.0 < arrived[0].predicted_ttft_ms <= expected, arrived[0].predicted_ttft_ms


def test_requests_that_find_the_engine_idle_teach_it_what_resuming_costs(tiny_hf):
    """What a request that found the engine idle waited beyond its price is added to the next such request's
    promise; a request that arrives right after a plan call adds nothing. The price here is zero, so the
    first request's whole TTFT is that extra."""
    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=128, spec_tokens=0), loaded=load(tiny_hf("llama")))
    engine.plan.report = dataclasses.replace(
        engine.plan.report, step_ms={1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}, prefill_row_ms=0.0, prompt_row_ms=0.0
    )
    vocab = engine.plan.cfg.vocab_size

    def run(req):
        while req.finish_reason is None:
            engine.step()
        return req

    engine.plan.last_call -= 1.0  # the engine idled for a second
    first = engine.submit(_prompt(3, 10, vocab), ONE)
    assert first.found_idle and first.resume_ms == 0.0 and first.predicted_ttft_ms == 0.0  # nothing learned yet
    waited = 1000 * (run(first).timings.first_token - first.timings.submitted)
    assert waited > 0.0
    engine.plan.last_call -= 1.0
    second = engine.submit(_prompt(4, 10, vocab), ONE)
    assert second.found_idle and second.resume_ms == second.predicted_ttft_ms == pytest.approx(waited)
    run(second)
    third = engine.submit(_prompt(5, 10, vocab), ONE)  # microseconds after the last plan call
    assert not third.found_idle and third.resume_ms == 0.0


def test_a_request_that_must_wait_for_a_slot_is_promised_nothing(tiny_hf):
    """With every slot taken its TTFT depends on how long the others run: NaN, not a number the plan
    cannot keep. One slot free: a number."""
    import math

    config = EngineConfig(slots=2, ctx=128, spec_tokens=0)
    engine = Engine.from_model(config=config, loaded=load(tiny_hf("llama")))
    engine.plan.report = dataclasses.replace(
        engine.plan.report, step_ms={1: 4.0, 2: 5.0}, prompt_row_ms=1.5, prefill_row_ms=1.0
    )
    vocab = engine.plan.cfg.vocab_size
    long = SamplingParams(max_tokens=50, ignore_eos=True)
    first = engine.submit(_prompt(1, 8, vocab), long)
    second = engine.submit(_prompt(2, 8, vocab), long)
    third = engine.submit(_prompt(3, 8, vocab), ONE)
    assert not math.isnan(second.predicted_ttft_ms) and math.isnan(third.predicted_ttft_ms)
    for r in (first, second, third):
        engine.cancel(r)
    engine.step()
    engine.stop()


class _SlowDraftModel:
    """A drafter that always proposes `k` copies of token 5, taking `seconds` to do it (a draft model's own
    steps): every decode step carries draft rows."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def reset(self, slot: int) -> None:
        pass

    def propose(self, slot: int, ids, k: int) -> list[int]:
        time.sleep(self.seconds)
        return [5] * k


def test_promises_follow_the_pace_the_machine_runs_the_plan_at(tiny_hf):
    """A machine that runs the plan slower than its calibration (here every plan call sleeps 20 ms beyond a
    4 ms price) is promised TTFTs at that pace once the engine has seen enough steps; before that, the
    plan's prices as they are."""
    config = EngineConfig(slots=2, ctx=128, spec_tokens=0, prefill_chunk=32)
    engine = Engine.from_model(config=config, loaded=load(tiny_hf("llama")))
    engine.plan.report = dataclasses.replace(
        engine.plan.report, step_ms={1: 4.0, 2: 5.0}, prompt_row_ms=0.5, prefill_row_ms=0.25
    )
    vocab = engine.plan.cfg.vocab_size
    with slowed_plan(engine, 0.02):
        price = engine.plan.report.ttft_ms([(0, 12)], 0, 32, 32)  # alone: a one-row step and 12 prompt rows
        first = engine.submit(_prompt(1, 12, vocab), ONE)
        assert first.predicted_ttft_ms == pytest.approx(price)  # no step has run: the calibration's price
        long = engine.submit(_prompt(2, 12, vocab), SamplingParams(max_tokens=12, ignore_eos=True))
        while long.finish_reason is None:
            engine.step()
        assert engine.pace.steps == engine.steps >= engine.pace.least
        assert engine.pace.factor >= 20.0 / 5.0  # no step took less than its sleep; each was priced 5 ms or less
        second = engine.submit(_prompt(3, 12, vocab), ONE)
        assert second.predicted_ttft_ms == pytest.approx(engine.pace.factor * price)


def test_steps_with_draft_rows_set_the_pace_priced_with_their_drafts_and_without_the_draft_models_time(tiny_hf):
    """A speculating user's steps mostly carry drafts; a pace of the others alone went stale while it
    spoke. A step's drafts are priced as a prompt's rows beside its decode row (4 ms + 1.5 ms a draft
    here), and what the drafter took (a draft model's steps, 30 ms here) is not the plan's: the pace is
    the plan calls' 20 ms sleep over their price, not the drafter's time as well."""
    config = EngineConfig(slots=2, ctx=128, spec_tokens=3)
    plain = Engine.from_model(config=config, loaded=load(tiny_hf("llama")))
    plain.plan.report = dataclasses.replace(
        plain.plan.report, step_ms={1: 4.0, 2: 5.0}, prompt_row_ms=1.5, prefill_row_ms=0.25
    )
    engine = Engine(plain.plan, plain.tokenizer, drafter=_SlowDraftModel(0.03))
    assert engine.drafter is not None
    priced: list[float] = []
    record = engine.pace.record
    engine.pace.record = lambda price, measured: (priced.append(price), record(price, measured))
    vocab = engine.plan.cfg.vocab_size
    req = engine.submit(_prompt(4, 12, vocab), SamplingParams(max_tokens=12, ignore_eos=True))
    with slowed_plan(engine, 0.02):
        while req.finish_reason is None:
            engine.step()
    assert engine.spec.drafted > 0
    assert engine.pace.steps == engine.steps == len(priced)  # every step, drafting or not
    assert 4.0 + 3 * 1.5 in priced  # a decode row and three drafts
    assert set(priced[1:]) <= {4.0 + k * 1.5 for k in range(4)}  # after the prompt's step: 0-3 drafts
    # each plan call slept 20 ms against a price of at most 8.5 ms; with the drafter's 30 ms counted too,
    # no step would be under 50 / 8.5
    assert 20.0 / 8.5 <= engine.pace.factor < 50.0 / 8.5, engine.pace.factor


def test_requests_that_arrive_together_keep_the_first_ones_promise(tiny_hf):
    """Three prompts submitted before the engine's next step. The first was promised a step of its own
    (4 + 20 x 1 ms); with the others beside it (4 + 60 x 1) it would end 40 ms late, so it runs alone and
    the others follow beside it decoding, as their own promises counted on. Before, every prompt waiting
    joined the first step, and the first user's TTFT was the whole burst's. (Beside decode rows a chunk is
    20 rows here, one prompt: the tiny model runs far faster than these prices, so a promise's time left,
    which the engine reads from the clock, would let more in than the prediction's priced steps did.)"""
    config = EngineConfig(slots=4, ctx=128, spec_tokens=0, prefill_chunk=20)
    engine = Engine.from_model(config=config, loaded=load(tiny_hf("llama")))
    engine.plan.report = dataclasses.replace(
        engine.plan.report, step_ms={1: 4.0, 2: 5.0, 3: 6.0, 4: 7.0}, prompt_row_ms=1.5, prefill_row_ms=1.0
    )
    vocab = engine.plan.cfg.vocab_size
    reqs = [engine.submit(_prompt(10 + i, 20, vocab), ONE) for i in range(3)]
    calls = []
    decode = engine.plan.decode

    def record(slots, *args, **kwargs):
        calls.append(sorted(set(slots)))
        return decode(slots, *args, **kwargs)

    engine.plan.decode = record
    try:
        while any(r.finish_reason is None for r in reqs):
            engine.step()
    finally:
        del engine.plan.decode
    first, second, third = (r.slot for r in reqs)
    assert calls[0] == [first]  # its own step, as promised
    assert calls[1] == sorted([first, second])  # the second's 20 rows beside the first's decode row
    assert third in calls[2] and first not in calls[2]  # the first has its two tokens
    # each promise was the steps the engine then ran: 24; + 4 + 20 x 1.5; + 5 + 20 x 1.5 (two decoding)
    predicted = [r.predicted_ttft_ms for r in reqs]
    assert predicted == pytest.approx([24.0, 58.0, 93.0], abs=2.0)  # less the microseconds since each submit

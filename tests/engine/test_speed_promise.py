"""The decode speed a request is promised with its first token (`Request.promised_tps`), on a real engine
with a known calibration: a token a step, each step at the plan's price for the slots held then, at the
mean position they will hold halfway through the request's budget, times the pace of steps at that load."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers.slow_plan import slowed_plan

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load

SIX = SamplingParams(max_tokens=6, ignore_eos=True)


class _FixedPace:
    """The engine's overall pace held at `factor` (the tiny model runs far faster than the prices set here,
    so a measured pace would move with every step)."""

    def __init__(self, factor: float) -> None:
        self.factor, self.steps = factor, 0

    def record(self, priced_ms: float, measured_ms: float) -> None:
        pass


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(5, vocab, (n - 1,), generator=g).tolist()


def _engine(tiny_hf, **report) -> Engine:
    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=256, spec_tokens=0), loaded=load(tiny_hf("llama")))
    engine.plan.report = dataclasses.replace(engine.plan.report, **report)
    engine.pace = _FixedPace(2.0)
    return engine


def _run(engine: Engine, reqs) -> None:
    for _ in range(400):
        if all(r.finish_reason is not None for r in reqs):
            return
        engine.step()
    raise AssertionError("the requests did not finish within 400 steps")


def test_a_burst_is_promised_the_step_of_every_slot_it_fills(tiny_hf):
    """Three requests submitted together. At submit the first found the engine empty; by its first token
    all three hold slots, and each is promised a token per three-slot step (6 ms) at the pace (2x): 83.3
    tokens a second, not the one-slot step's 125."""
    engine = _engine(tiny_hf, step_ms={1: 4.0, 2: 5.0, 3: 6.0, 4: 7.0}, step_ms_far={})
    vocab = engine.plan.cfg.vocab_size
    reqs = [engine.submit(_prompt(i, 12, vocab), SIX) for i in range(3)]
    _run(engine, reqs)
    assert [r.promised_tps for r in reqs] == pytest.approx([1000.0 / (2.0 * 6.0)] * 3)


def test_a_later_request_is_promised_the_slots_held_when_its_first_token_comes(tiny_hf):
    """One request decodes alone (one slot: 4 ms); a second arrives later and joins it (two slots: 5 ms)."""
    engine = _engine(tiny_hf, step_ms={1: 4.0, 2: 5.0, 3: 6.0, 4: 7.0}, step_ms_far={})
    vocab = engine.plan.cfg.vocab_size
    first = engine.submit(_prompt(1, 12, vocab), SamplingParams(max_tokens=40, ignore_eos=True))
    while first.timings.first_token is None:
        engine.step()
    second = engine.submit(_prompt(2, 12, vocab), SIX)
    _run(engine, [first, second])
    assert first.promised_tps == pytest.approx(1000.0 / (2.0 * 4.0))
    assert second.promised_tps == pytest.approx(1000.0 / (2.0 * 5.0))


def test_the_promise_prices_the_rows_where_they_stand_halfway_through_the_budget(tiny_hf):
    """With the far calibration a step costs more the more each row has cached, so the promise covers the
    rest of the request's budget at the mean position it will hold halfway through: a 40-token prompt with
    max_tokens 6 at position 40 + 5 / 2, with max_tokens 200 at 40 + 199 / 2, a slower promise."""
    engine = _engine(tiny_hf, step_ms={1: 4.0}, step_ms_far={1: 40.0}, far_position=1024)
    vocab = engine.plan.cfg.vocab_size
    short = engine.submit(_prompt(3, 40, vocab), SIX)
    _run(engine, [short])
    long = engine.submit(_prompt(4, 40, vocab), SamplingParams(max_tokens=200, ignore_eos=True))
    _run(engine, [long])
    report = engine.plan.report
    assert report.step_ms_at(1, 139.5) > report.step_ms_at(1, 42.5) + 1  # the far calibration moves the price
    assert short.promised_tps == pytest.approx(1000.0 / (2.0 * report.step_ms_at(1, 42.5)))
    assert long.promised_tps == pytest.approx(1000.0 / (2.0 * report.step_ms_at(1, 139.5)))


def test_the_promise_takes_the_pace_of_recent_steps_at_its_own_load(tiny_hf):
    """Every plan call sleeps 20 ms beyond a 4 ms price. The first request's promise, made before any step
    of decode rows alone had run, takes the engine's overall pace (held at 2x here); once a dozen one-row
    steps have run at 5x their price or more, the next request alone is promised their pace, not 2x."""
    engine = _engine(tiny_hf, step_ms={1: 4.0, 2: 5.0, 3: 6.0, 4: 7.0}, step_ms_far={})
    vocab = engine.plan.cfg.vocab_size
    with slowed_plan(engine, 0.02):
        first = engine.submit(_prompt(5, 12, vocab), SamplingParams(max_tokens=12, ignore_eos=True))
        _run(engine, [first])
        one_row = engine.decode_pace.factor(1, otherwise=float("nan"))
        assert one_row >= 20.0 / 4.0  # learned from the first request's one-row steps
        second = engine.submit(_prompt(6, 12, vocab), SIX)
        _run(engine, [second])
    assert first.promised_tps == pytest.approx(1000.0 / (2.0 * 4.0))
    assert second.promised_tps == pytest.approx(1000.0 / (one_row * 4.0))
    assert math.isnan(engine.decode_pace.factor(2, otherwise=float("nan")))  # no two-row step has run


def test_an_uncalibrated_plan_promises_no_speed(tiny_hf):
    engine = _engine(tiny_hf, step_ms={}, step_ms_far={})
    req = engine.submit(_prompt(7, 12, engine.plan.cfg.vocab_size), SIX)
    _run(engine, [req])
    assert req.timings.first_token is not None and math.isnan(req.promised_tps)

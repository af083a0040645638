"""Disaggregated prefill: prompts on a prefill worker process, their KV moved into the engine's decode
slots over gloo. Same tokens and logprobs as colocated; a killed worker fails its prompt and is replaced."""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine

GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=True, ignore_eos=True)
PROMPTS = ["w1 w2 w3 w4 w5", "w9 w8", "w3 w3 w3 w7 w1 w2 w5 w6 w9 w10 w11"]


def _engine(path: str, layout: str) -> Engine:
    config = EngineConfig(slots=2, ctx=128, weights="int8", kernels="cpp", spec_tokens=0, layout=layout, threads=2)
    return Engine.from_model(path, config, calibrate=False)


@pytest.fixture(scope="module")
def colocated(tiny_hf):
    return _engine(str(tiny_hf("llama")), "colocated")


def test_disaggregated_gives_the_colocated_tokens(tiny_hf, colocated):
    engine = _engine(str(tiny_hf("llama")), "disaggregated")
    try:
        assert engine.prefiller is not None and engine.config.threads == 1  # the cores split between the two
        got = engine.generate(PROMPTS, GREEDY, chat=False)  # 3 prompts, 2 slots: a slot is reused
        want = colocated.generate(PROMPTS, GREEDY, chat=False)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [[x.logprob for x in c.choices] for c in got] == [[x.logprob for x in c.choices] for c in want]
    finally:
        engine.prefiller.close()


def test_a_killed_prefill_worker_fails_its_prompt_and_is_replaced(tiny_hf, colocated):
    engine = _engine(str(tiny_hf("llama")), "disaggregated")
    worker = engine.prefiller
    try:
        engine.start()
        os.kill(worker._process.pid, signal.SIGKILL)
        worker._process.join(timeout=10)
        events: queue.Queue = queue.Queue()
        t0 = time.monotonic()
        engine.submit(engine.encode_prompt(PROMPTS[0], chat=False), GREEDY, events.put)
        delta = events.get(timeout=10)
        assert delta.finish_reason == "error" and "prefill worker failed" in delta.error
        assert time.monotonic() - t0 < 5.0
        again = engine.generate(PROMPTS[0], GREEDY, chat=False)  # a new worker serves the next prompt
        assert again.token_ids == colocated.generate(PROMPTS[0], GREEDY, chat=False).token_ids
        assert worker.restarts == 1
    finally:
        engine.stop()
        worker.close()

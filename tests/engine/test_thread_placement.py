"""A plan's compute threads each on a core of their own (EngineConfig.pin_threads, compile/stages.py
thread_placement): the kernels' pool workers pinned at compile time, the engine's thread as it starts; and
left to the OS where the placement is not this process's to make."""

from __future__ import annotations

import os
import threading

import pytest
from helpers.threads import thread_cpus, workers_cpus

from metronome.compile.stages import thread_placement
from metronome.config import EngineConfig, Layout, SamplingParams
from metronome.engine import Engine

ALLOWED = sorted(os.sched_getaffinity(0))
TWO_CORES = pytest.mark.skipif(len(ALLOWED) < 2, reason="placing two threads needs two CPUs")


@TWO_CORES
def test_the_engine_thread_and_the_pool_worker_run_on_cores_of_their_own(tiny_hf) -> None:
    engine = Engine.from_model(str(tiny_hf("llama")), EngineConfig(slots=2, threads=2, spec_tokens=0))
    cpus = engine.plan.report.cpus
    assert cpus == tuple(ALLOWED[:2])
    engine.start()
    try:
        engine.generate("the cat", SamplingParams(max_tokens=4))  # steps on the engine's thread
        assert thread_cpus(engine.thread_id) == {cpus[0]}
        assert workers_cpus() == [{cpus[1]}]
        assert thread_cpus(threading.get_native_id()) == set(ALLOWED), "the caller's own thread was pinned"
    finally:
        engine.stop()


@TWO_CORES
def test_without_pin_threads_the_os_places_every_thread(tiny_hf) -> None:
    engine = Engine.from_model(
        str(tiny_hf("llama")), EngineConfig(slots=2, threads=2, spec_tokens=0, pin_threads=False)
    )
    assert engine.plan.report.cpus == ()
    engine.start()
    try:
        engine.generate("the cat", SamplingParams(max_tokens=4))
        assert thread_cpus(engine.thread_id) == set(ALLOWED)
        assert workers_cpus() == [set(ALLOWED)]
    finally:
        engine.stop()


@pytest.mark.parametrize(
    ("config", "threads", "why"),
    [
        (EngineConfig(pin_threads=False), 2, "not asked"),
        (EngineConfig(), 1, "one thread has no one to share a core with"),
        (EngineConfig(), len(ALLOWED) + 1, "more threads than cores: a pinned thread could not step aside"),
        (EngineConfig(layout=Layout.DISAGGREGATED), 2, "the prefill worker's process shares the cores"),
        (EngineConfig(tp=2), 2, "the ranks' processes share the cores"),
    ],
)
def test_threads_are_left_to_the_os_where_the_placement_is_not_this_process_s(config, threads, why) -> None:
    assert thread_placement(config, threads) == (), why


def test_pin_threads_is_a_bool() -> None:
    with pytest.raises(ValueError, match="pin_threads"):
        EngineConfig(pin_threads="no")  # type: ignore[arg-type]


def test_more_threads_than_cores_is_said_with_what_to_do(tiny_hf) -> None:
    """--threads 64 on 2 cores ran several times slower than --threads 2, without a word (steps' threads
    wait on each other); it is a warning the CLI and `serve` print, not a refusal."""
    over = len(ALLOWED) + 1
    engine = Engine.from_model(str(tiny_hf("llama")), EngineConfig(slots=1, ctx=64, threads=over, spec_tokens=0))
    try:
        [said] = [w for w in engine.plan.report.warnings if "cores" in w]
        assert f"threads={over}" in said and f"the {len(ALLOWED)} cores" in said and "--threads" in said
    finally:
        engine.close()
    engine = Engine.from_model(str(tiny_hf("llama")), EngineConfig(slots=1, ctx=64, threads=len(ALLOWED)))
    try:
        assert not [w for w in engine.plan.report.warnings if "cores" in w]
    finally:
        engine.close()

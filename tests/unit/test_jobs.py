"""serve/jobs.py's Job as the event loop sees it, on a stand-in engine: each choice ends once, however many
end events reach it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from metronome.config import SamplingParams
from metronome.engine import Delta
from metronome.engine.request import Timings
from metronome.engine.sampler import Choice
from metronome.serve.jobs import ChoiceRun, Job, JobSpec


def test_a_choice_that_ended_is_not_ended_again_by_the_engines_own_end():
    """stop() ends a choice with an error event while the engine, in the same instant, finishes it its own
    way: both ends reach the queue. Taken twice, the second end counted as another choice's, and the loop
    stopped before choice 1 ended (never counted in the metrics; with more ends, settle() waited for ever)."""
    observed = []
    metrics = SimpleNamespace(observe_request=lambda *a, **k: observed.append(a[4]))

    async def run() -> list[tuple[int, str | None]]:
        engine = SimpleNamespace(tokenizer=SimpleNamespace(eos_ids=[0]))
        job = Job(engine, JobSpec(((1, 2),), SamplingParams(), 2), metrics, "req")
        timings = Timings(submitted=0.0)
        for i in range(2):
            request = SimpleNamespace(
                id=f"r{i}",
                timings=timings,
                prompt_ids=[1, 2],
                output_ids=[],
                cached_tokens=0,
                predicted_ttft_ms=0.0,
                promised_tps=float("nan"),
            )
            job.runs.append(ChoiceRun(i, request))
        for index, finish in ((0, "error"), (0, "cancelled"), (1, None), (1, "length")):
            job.events.put_nowait((index, 0.0, Delta(f"r{index}", "x", (), finish)))
        return [(run.index, delta.finish_reason) for run, delta, _ in [item async for item in job.deltas()]]

    seen = asyncio.run(asyncio.wait_for(run(), timeout=10))
    assert seen == [(0, "error"), (1, None), (1, "length")]
    assert observed == ["error", "length"]


def test_an_end_of_sequence_is_left_out_of_logprobs_only_where_it_stopped_the_answer():
    """A final EOS that ended the answer ('stop') is not part of the reply, so its logprob is not listed. An
    answer cut by max_tokens ('length', e.g. with ignore_eos) whose last token is EOS lists it: the client
    got that token's text."""
    eos = 0
    tokens = (Choice(5, -0.1, ()), Choice(eos, -0.2, ()))
    for finish, want in (("stop", [5]), ("length", [5, eos]), (None, [5, eos])):
        run = ChoiceRun(0, SimpleNamespace())
        reported = run.absorb(Delta("r", "x", tokens, finish), 1.0, (eos,))
        assert [c.token for c in reported] == want, finish
        assert [c.token for c in run.tokens] == want and run.finish_reason == finish


def test_stopping_the_server_ends_only_the_choices_still_running():
    """stop() (the server shutting down) ends each unfinished choice with an error event and cancels its
    request. A choice the serving layer already ended (a stop string found in its text), whose engine request
    has not ended yet, keeps its own end: no error event after it, no second end."""
    cancelled: list[str] = []

    async def run() -> list[tuple[int, str | None, str | None]]:
        engine = SimpleNamespace(tokenizer=SimpleNamespace(eos_ids=[0]), cancel=lambda r: cancelled.append(r.id))
        metrics = SimpleNamespace(observe_request=lambda *a, **k: None)
        job = Job(engine, JobSpec(((1, 2),), SamplingParams(), 3), metrics, "req")
        for i in range(3):
            job.runs.append(ChoiceRun(i, SimpleNamespace(id=f"r{i}", finish_reason=None)))
        job.runs[0].finish_reason = "stop"  # ended here; its engine request is still being cancelled
        job.runs[2].request.finish_reason = "length"  # the engine ended it; its end event is on its way
        job.stop("the server is shutting down")
        ended = []
        while not job.events.empty():
            index, _stamp, delta = job.events.get_nowait()
            ended.append((index, delta.finish_reason, delta.error))
        return ended

    assert asyncio.run(asyncio.wait_for(run(), timeout=10)) == [(1, "error", "the server is shutting down")]
    assert cancelled == ["r1"]

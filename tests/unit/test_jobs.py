"""serve/jobs.py's Job as the event loop sees it, on a stand-in engine: each choice ends once, however many
end events reach it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from metronome.config import SamplingParams
from metronome.engine import Delta
from metronome.engine.request import Timings
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
                id=f"r{i}", timings=timings, prompt_ids=[1, 2], output_ids=[], cached_tokens=0, predicted_ttft_ms=0.0
            )
            job.runs.append(ChoiceRun(i, request))
        for index, finish in ((0, "error"), (0, "cancelled"), (1, None), (1, "length")):
            job.events.put_nowait((index, 0.0, Delta(f"r{index}", "x", (), finish)))
        return [(run.index, delta.finish_reason) for run, delta, _ in [item async for item in job.deltas()]]

    seen = asyncio.run(asyncio.wait_for(run(), timeout=10))
    assert seen == [(0, "error"), (1, None), (1, "length")]
    assert observed == ["error", "length"]

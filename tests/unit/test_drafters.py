"""PayingDrafter pauses drafting where it does not pay and goes on where it does, judged on its own
timings (a simulated engine with a fake clock: draft cost per token, step cost with and without drafts,
acceptance)."""

from __future__ import annotations

import pytest

from metronome.engine.speculate import PayingDrafter


class Sim:
    """A lone request: each step calls `propose`, the drafts cost `draft_s` each, then the step runs."""

    def __init__(self, draft_s: float, plain_s: float, spec_s: float, accept: int) -> None:
        self.t = 0.0
        self.draft_s, self.plain_s, self.spec_s, self.accept = draft_s, plain_s, spec_s, accept
        sim = self

        class Inner:
            def reset(self, slot: int) -> None:
                pass

            def propose(self, slot: int, ids, k: int) -> list[int]:
                sim.t += sim.draft_s * k
                return [7] * k

        self.drafter = PayingDrafter(Inner(), clock=lambda: self.t)
        self.ids = [1, 2, 3]
        self.steps_with_drafts = 0

    def run(self, steps: int, k: int = 4) -> "Sim":
        for _ in range(steps):
            drafts = self.drafter.propose(0, self.ids, k)
            self.t += self.spec_s if drafts else self.plain_s
            self.steps_with_drafts += bool(drafts)
            self.ids = self.ids + [7] * (1 + min(self.accept, len(drafts)))
        return self


def test_drafting_that_pays_goes_on():
    sim = Sim(draft_s=0.05, plain_s=1.0, spec_s=1.05, accept=3).run(400)
    assert sim.drafter.pauses == 0
    assert sim.steps_with_drafts >= 400 - sim.drafter.probe  # only the early plain probe
    assert sim.drafter.plain_s == pytest.approx(1.0)


def test_drafting_that_costs_pauses_longer_and_longer():
    sim = Sim(draft_s=0.3, plain_s=1.0, spec_s=1.1, accept=0).run(1000)
    assert sim.drafter.pauses >= 4
    assert sim.drafter.pause == sim.drafter.max_pause or sim.drafter.pause >= 64
    assert sim.steps_with_drafts < 0.1 * 1000


def test_judged_against_plain_steps_not_the_verify_step():
    """Extra rows cost here (2.0 s with drafts vs 1.0 s without): 2 tokens per drafting step look like a gain
    against the drafting step's own time (2 * 2.0 > 0.2 + 2.0) but lose against plain steps (2 * 1.0)."""
    sim = Sim(draft_s=0.05, plain_s=1.0, spec_s=2.0, accept=1).run(600)
    assert sim.drafter.pauses >= 3
    assert sim.steps_with_drafts < 0.25 * 600


def test_a_gap_of_several_steps_is_not_learned_from():
    sim = Sim(draft_s=0.05, plain_s=1.0, spec_s=1.05, accept=3).run(20)
    before = sim.drafter.drafting_steps
    sim.t += 1000.0  # other requests ran (no propose calls) and the text grew by many tokens
    sim.ids = sim.ids + [7] * 50
    sim.run(1)
    assert sim.drafter.drafting_steps == before  # that step's timing was not judged
    assert sim.drafter.pauses == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_pause"):
        PayingDrafter(Sim(0, 1, 1, 0).drafter.inner, pause=10, max_pause=5)

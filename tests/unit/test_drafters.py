"""PayingDrafter pauses drafting where it does not pay and goes on where it does, judged on its own
timings (a simulated engine with a fake clock: draft cost per token, step cost with and without drafts,
acceptance)."""

from __future__ import annotations

import pytest

from metronome.engine.speculate import LookupOrModel, PayingDrafter


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
    # only the plain probes: one early, then one every reprobe_after drafting steps
    assert sim.steps_with_drafts >= 400 - sim.drafter.probe * (1 + 400 // sim.drafter.reprobe_after)
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


def test_one_stretched_plain_step_does_not_hide_that_drafting_loses():
    """A garbage collection or another process can stretch one step 60x. Taken into a mean plain step, it
    made every drafting window look like a gain, and with no pause there was no plain step to correct it."""
    sim = Sim(draft_s=0.3, plain_s=1.0, spec_s=1.1, accept=0).run(200)
    while sim.drafter.paused != 1:
        sim.run(1)
    sim.plain_s = 60.0
    sim.run(1)  # the pause's last step, stretched
    sim.plain_s = 1.0
    assert sim.drafter.plain_s == pytest.approx(1.0)
    before = sim.drafter.pauses
    sim.run(600)
    assert sim.drafter.pauses > before


def test_a_plain_step_timed_cold_is_timed_again():
    """The first plain probe ran while the caches were cold (3 s a step); plain steps then take 1 s, and
    drafting (2 tokens for 2.3 s) loses. Judged against the cold figure it would look like a gain forever:
    the probes that follow correct it."""
    sim = Sim(draft_s=0.3, plain_s=3.0, spec_s=1.1, accept=1).run(10)
    assert sim.drafter.plain_s == pytest.approx(3.0)
    sim.plain_s = 1.0
    sim.run(1000)
    assert sim.drafter.plain_s == pytest.approx(1.0) and sim.drafter.pauses >= 2


def test_a_gap_of_several_steps_is_not_learned_from():
    sim = Sim(draft_s=0.05, plain_s=1.0, spec_s=1.05, accept=3).run(20)
    before = sim.drafter.drafting_steps
    sim.t += 1000.0  # other requests ran (no propose calls) and the text grew by many tokens
    sim.ids = sim.ids + [7] * 50
    sim.run(1)
    assert sim.drafter.drafting_steps == before  # that step's timing was not judged
    assert sim.drafter.pauses == 0


def test_drafting_that_pays_again_starts_the_next_pause_short():
    """After long pauses, drafting that pays again (the text began to quote its prompt) resets the pause:
    a later loss costs min_pause plain steps, not the max_pause the old losses had reached."""
    sim = Sim(draft_s=0.3, plain_s=1.0, spec_s=1.1, accept=0).run(300)
    assert sim.drafter.pause > sim.drafter.min_pause
    sim.draft_s, sim.spec_s, sim.accept = 0.05, 1.05, 3
    sim.run(sim.drafter.max_pause + 60)
    assert sim.drafter.pause == sim.drafter.min_pause


def test_a_step_of_another_slot_or_after_a_reset_is_not_timed():
    """The time between two calls is one step of this request only if the same slot asked last and nothing
    was reset between: otherwise it spans other requests' work and would be learned as a plain step."""
    t = [0.0]

    class Empty:
        def reset(self, slot: int) -> None:
            pass

        def propose(self, slot: int, ids, k: int) -> list[int]:
            return []

    drafter = PayingDrafter(Empty(), clock=lambda: t[0])
    drafter.propose(0, [1] * 10, 4)
    t[0] += 1.0
    drafter.propose(1, [1] * 11, 4)  # another slot
    assert list(drafter.plain_times) == []
    drafter.reset(1)
    t[0] += 100.0
    drafter.propose(1, [1] * 12, 4)  # after a reset
    assert list(drafter.plain_times) == []
    t[0] += 1.0
    drafter.propose(1, [1] * 13, 4)  # the same slot, one token on: a plain step of 1 s
    assert list(drafter.plain_times) == [1.0]


def test_the_catch_up_after_a_pause_is_not_judged():
    """A draft model that sat out a pause first catches up on the tokens it did not see, a slow call (here
    50 s, the rest 0.05 s). Judged, that one call makes its window lose, and drafting that pays would pause
    again after every probe."""
    t, seen = [0.0], [0]

    class CatchingUp:
        def reset(self, slot: int) -> None:
            pass

        def propose(self, slot: int, ids, k: int) -> list[int]:
            t[0] += 50.0 if len(ids) - seen[0] > k + 1 else 0.05 * k
            seen[0] = len(ids)
            return [7] * k

    drafter = PayingDrafter(CatchingUp(), clock=lambda: t[0])
    ids, plain_steps = [1, 2, 3], 0
    seen[0] = len(ids)
    for _ in range(400):
        drafts = drafter.propose(0, ids, 4)
        t[0] += 1.05 if drafts else 1.0
        plain_steps += not drafts
        ids = ids + [7] * (1 + len(drafts) // 4 * 3)  # 3 of 4 drafts accepted
    assert drafter.pauses == 0, drafter.pauses
    assert plain_steps <= drafter.probe * (1 + 400 // drafter.reprobe_after)  # the probes only


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_pause"):
        PayingDrafter(Sim(0, 1, 1, 0).drafter.inner, pause=10, max_pause=5)


class Scripted:
    """A drafter whose guess is `fn(ids, k)`, counting its calls."""

    def __init__(self, fn) -> None:
        self.fn, self.calls, self.resets = fn, 0, 0

    def reset(self, slot: int) -> None:
        self.resets += 1

    def propose(self, slot: int, ids, k: int) -> list[int]:
        self.calls += 1
        return self.fn(ids, k)


def test_lookup_or_model_calls_the_model_only_where_the_text_stops_copying():
    """Lookup guesses the text right before position 300 and from 600 on, wrong in between (free writing
    inside a code edit); the draft model is always right. The model is called only in between: after 6
    steps of wrong guesses, and no longer once lookup's guess has matched the text 4 steps in a row."""
    text = list(range(2000))
    lookup = Scripted(lambda ids, k: [9999] * k if 300 <= len(ids) < 600 else text[len(ids) : len(ids) + k])
    model = Scripted(lambda ids, k: text[len(ids) : len(ids) + k])
    drafter = LookupOrModel(lookup, model, slots=2)
    ids, called_at = text[:10], []
    while len(ids) < 900:
        before = model.calls
        drafts = drafter.propose(1, ids, 4)
        if model.calls > before:
            called_at.append(len(ids))
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == text[len(ids) + accepted]:
            accepted += 1
        ids = text[: len(ids) + accepted + 1]  # the accepted drafts and one more token
    assert called_at and 300 < called_at[0] <= 306 and called_at[-1] < 600 + 4 * 5
    assert len(called_at) >= (600 - 306) // 5 - 1  # every step in between, 5 tokens each
    assert drafter.switches == 2
    drafter.reset(1)
    assert lookup.resets == model.resets == 1 and not drafter.modelled[1]


def test_prompt_lookup_takes_the_longest_then_the_latest_match():
    from metronome.engine.speculate import NgramDrafter

    # the 3-gram "1 2 3" matches at 0 (followed by 9 5 2); the 2-gram "2 3" also at 5 (followed by 8): longest wins
    assert NgramDrafter(3, 2).propose(0, [1, 2, 3, 9, 5, 2, 3, 8, 1, 2, 3], 3) == [9, 5, 2]
    # "1 2" occurs at 0 and 3: what followed the latest is the better guess (the text is repeating it now)
    assert NgramDrafter(2, 2).propose(0, [1, 2, 7, 1, 2, 8, 1, 2], 2) == [8, 1]
    assert NgramDrafter(2, 2).propose(0, [1, 2, 3, 4], 2) == []  # nothing to quote: free, no drafts
    for bad in ({"min_n": 0}, {"max_n": 2, "min_n": 3}):
        with pytest.raises(ValueError, match="min_n"):
            NgramDrafter(**bad)


def test_an_empty_lookup_guess_never_counts_as_the_text_copying():
    """Where lookup has no guess ([] each step), the slot stays with the draft model: an empty guess
    matched the text vacuously, and 4 of them in a row sent the slot back to lookup, which had nothing."""
    text = list(range(500))
    lookup = Scripted(lambda ids, k: [])
    model = Scripted(lambda ids, k: text[len(ids) : len(ids) + k])
    drafter = LookupOrModel(lookup, model, slots=1)
    ids = text[:10]
    for _ in range(40):
        drafts = drafter.propose(0, ids, 4)
        ids = text[: len(ids) + len(drafts) + 1]
    assert drafter.modelled[0] and drafter.switches == 1
    assert model.calls == 40 - 5  # every step from the 6th miss on


def test_a_window_probe_and_pause_last_exactly_their_lengths():
    """Drafting that loses is judged after exactly `window` judged steps; the early probe is `probe` plain
    steps and the pause that follows the losing window `pause` plain steps, not one fewer or more."""
    sim = Sim(draft_s=0.3, plain_s=1.0, spec_s=1.1, accept=0)
    drafter, plain_runs, run = sim.drafter, [], 0
    for _ in range(40):
        before = sim.steps_with_drafts
        sim.run(1)
        if sim.steps_with_drafts == before:
            run += 1
        elif run:
            plain_runs.append(run)
            run = 0
        if drafter.pauses == 1 and not plain_runs[1:]:
            assert drafter.drafting_steps == drafter.window
    assert plain_runs[:2] == [drafter.probe, drafter.min_pause]


def test_prompt_lookup_matches_the_whole_n_gram_within_the_window():
    """An n-gram matches only where all n tokens are equal (not its first n-1), and only the last `window`
    tokens of the text are searched."""
    from metronome.engine.speculate import NgramDrafter

    assert NgramDrafter(3, 3).propose(0, [1, 2, 7, 5, 1, 2, 3], 2) == []
    assert NgramDrafter(3, 3).propose(0, [1, 2, 3, 5, 1, 2, 3], 2) == [5, 1]
    text = [5, 6, 5, 6, 1, 2, 3, 1, 2]
    assert NgramDrafter(2, 2, window=5).propose(0, text, 2) == [3, 1]
    assert NgramDrafter(2, 2, window=4).propose(0, text, 2) == []  # the earlier "1 2" is outside the window


def test_lookup_or_model_reset_starts_the_slot_with_lookup_and_bad_settings_are_refused():
    """A new request in a slot starts with lookup alone, even if the last one ended in draft-model mode."""
    lookup = Scripted(lambda ids, k: [])
    model = Scripted(lambda ids, k: [7] * k)
    drafter = LookupOrModel(lookup, model, slots=1, misses=2)
    for n in range(10, 13):
        drafter.propose(0, list(range(n)), 4)
    assert drafter.modelled[0]
    drafter.reset(0)
    assert not drafter.modelled[0] and drafter.streak[0] == 0
    calls = model.calls
    drafter.propose(0, [1, 2, 3], 4)
    assert model.calls == calls  # the first step after the reset asks lookup only
    for bad in ({"slots": 0}, {"misses": 0}, {"hits": 0}):
        with pytest.raises(ValueError, match="hits"):
            LookupOrModel(lookup, model, **{"slots": 1, **bad})

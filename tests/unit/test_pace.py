"""The engine's pace (engine/pace.py): the median of its recent steps' measured time over the plan's price."""

from __future__ import annotations

import pytest

from metronome.engine.pace import Pace


def test_the_pace_is_one_until_enough_steps_then_their_median():
    pace = Pace(window=5, least=3)
    pace.record(2.0, 4.0)
    pace.record(2.0, 3.0)
    assert pace.factor == 1.0 and pace.steps == 2  # two steps are not yet a pace
    pace.record(2.0, 100.0)  # one step that waited for something else (a collection, a page fault)
    assert pace.factor == 2.0  # median of 2.0, 1.5 and 50: that step does not move it


def test_the_pace_forgets_steps_older_than_its_window():
    pace = Pace(window=3, least=1)
    for measured in (10.0, 10.0, 10.0, 1.0, 1.0):
        pace.record(1.0, measured)
    assert pace.steps == 3 and pace.factor == 1.0  # 10, 1, 1: the machine came back to its calibration


def test_a_step_without_a_price_says_nothing_about_the_pace():
    pace = Pace(window=4, least=1)
    for priced in (float("nan"), 0.0, -1.0):
        pace.record(priced, 5.0)
    pace.record(2.0, float("nan"))
    pace.record(2.0, 0.0)
    assert pace.steps == 0 and pace.factor == 1.0
    pace.record(2.0, 5.0)
    assert pace.factor == 2.5


@pytest.mark.parametrize(("window", "least"), [(0, 1), (4, 0), (4, 5)])
def test_a_window_that_cannot_hold_its_least_is_refused(window, least):
    with pytest.raises(ValueError, match="window"):
        Pace(window=window, least=least)

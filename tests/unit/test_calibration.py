"""The plan's calibration on a machine whose speed drifts: a fake runner whose calls cost a known time,
three times longer during a 'slow minute'. Timed figure after figure, the slow minute lands on some figures
only and their ratios (what chunked prefill is priced by) come out wrong; interleaved rounds keep them.

The costs advance a virtual clock that calibration reads in place of time.perf_counter: with real sleeps a
4 ms call measured 6.7 ms once on a loaded 2-core CI machine, and the test failed on the oversleep."""

from __future__ import annotations

import pytest
import torch

from metronome.compile import probe
from metronome.compile.probe import calibrate, far_position

SLOTS, CTX, CHUNK = 2, 2048, 8


class DriftingRunner:
    """Costs in ms: a decode step 2 + 1 per row + a row's position / 1024; a prompt row 0.05 alone. Calls number
    `slow_from` .. `slow_from + slow_calls` take three times as long."""

    any_rows = True

    def __init__(self, slow_from: int, slow_calls: int) -> None:
        self.calls, self.slow = 0, range(slow_from, slow_from + slow_calls)
        self.now = 0.0  # seconds on the virtual clock

    def perf_counter(self) -> float:
        return self.now

    def _spend(self, ms: float) -> None:
        factor = 3.0 if self.calls in self.slow else 1.0
        self.calls += 1
        self.now += ms * factor / 1000

    def decode(self, slots, tokens, positions, logit_rows=None):
        self._spend(2 + len(slots) + sum(positions) / 1024)

    def prefill(self, ids, slot):
        self._spend(0.05 * len(ids))


def expected_step(live: int, position: int) -> float:
    return 2 + live + live * position / 1024


def test_a_slow_minute_does_not_skew_the_calibrations_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = (
        2 * SLOTS + 4
    )  # near and far per live count, the alone prefill, a step without a chunk, with one near and far
    runner = DriftingRunner(slow_from=figures, slow_calls=2 * figures)  # the first two of five rounds, after warm-up
    monkeypatch.setattr(probe, "time", runner)  # calibration's clock: the runner's virtual one
    c = calibrate(runner, SLOTS, CTX, torch.device("cpu"), CHUNK)
    far = min(far_position(CTX), CTX - 1)
    for live in range(1, SLOTS + 1):
        assert abs(c.step_ms[live] / expected_step(live, 64) - 1) < 0.25, (live, c.step_ms)
        assert abs(c.step_ms_far[live] / expected_step(live, far) - 1) < 0.25, (live, c.step_ms_far)
    # a prompt row alone, beyond the one-row step its call pays
    alone = (0.05 * 256 - expected_step(1, 64)) / 256
    assert abs(c.prefill_row_ms / alone - 1) < 0.25, c.prefill_row_ms
    # a prompt row beside decode rows: the mixed step's extra cost per chunk row (1 ms + its position / 1024),
    # near a prompt's start (rows 256..) and deep into it (rows 1024..)
    for got, first in ((c.prompt_row_ms, 256), (c.prompt_row_ms_far, 1024)):
        per_row = 1 + (first + (CHUNK - 1) / 2) / 1024
        assert abs(got / per_row - 1) < 0.25, (first, got)

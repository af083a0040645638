"""The plan's calibration on a machine whose speed drifts: a fake runner whose calls cost a known time,
three times longer during a 'slow minute'. Timed figure after figure, the slow minute lands on some figures
only and their ratios (what chunked prefill is priced by) come out wrong; interleaved rounds keep them.
And on a machine where a short call runs slow right after a different one: each figure is timed warm.

The costs advance a virtual clock that calibration reads in place of time.perf_counter: with real sleeps a
4 ms call measured 6.7 ms once on a loaded 2-core CI machine, and the test failed on the oversleep."""

from __future__ import annotations

import pytest
import torch

from metronome.compile import probe
from metronome.compile.probe import calibrate, far_position

SLOTS, CTX, CHUNK = 2, 2048, 8


class DriftingRunner:
    """Costs in ms: a decode step 2 + 1 per row + a row's position / 1024; a prompt row 0.05 alone. Calls that
    start in [slow_from, slow_until) on the virtual clock (seconds) take three times as long. With `cold`,
    a call also takes twice as long until calls of its shape have run for 15 ms in a row."""

    any_rows = True

    def __init__(self, slow_from: float = 0.0, slow_until: float = 0.0, cold: bool = False) -> None:
        self.slow_from, self.slow_until, self.cold = slow_from, slow_until, cold
        self.now = 0.0  # seconds on the virtual clock
        self.calls = 0
        self.shape: tuple = ()
        self.shape_since = 0.0  # when the current run of calls of one shape began

    def perf_counter(self) -> float:
        return self.now

    def _spend(self, ms: float, shape: tuple) -> None:
        if shape != self.shape:
            self.shape, self.shape_since = shape, self.now
        factor = 3.0 if self.slow_from <= self.now < self.slow_until else 1.0
        if self.cold and self.now - self.shape_since < 0.015:
            factor *= 2.0
        self.calls += 1
        self.now += ms * factor / 1000

    def decode(self, slots, tokens, positions, logit_rows=None):
        self._spend(2 + len(slots) + sum(positions) / 1024, ("decode", len(slots), positions[-1]))

    def prefill(self, ids, slot):
        self._spend(0.05 * len(ids), ("prefill", len(ids)))


def expected_step(live: int, position: int) -> float:
    return 2 + live + live * position / 1024


def test_a_slow_minute_does_not_skew_the_calibrations_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    # where the rounds fall on the virtual clock: a first run without the slow minute
    figures = (
        2 * SLOTS + 4
    )  # near and far per live count, the alone prefill, a step without a chunk, with one near and far
    dry = DriftingRunner()
    monkeypatch.setattr(probe, "time", dry)  # calibration's clock: the runner's virtual one
    warmed_up = []
    decode = dry.decode

    def note_warm_up(*args, **kwargs):
        if dry.calls == figures:  # every figure has run once: the rounds begin
            warmed_up.append(dry.now)
        return decode(*args, **kwargs)

    monkeypatch.setattr(dry, "decode", note_warm_up)
    calibrate(dry, SLOTS, CTX, torch.device("cpu"), CHUNK)
    start, round_s = warmed_up[0], (dry.now - warmed_up[0]) / probe.CALIBRATION_ROUNDS
    runner = DriftingRunner(slow_from=start, slow_until=start + 2 * round_s)  # the first two of five rounds
    monkeypatch.setattr(probe, "time", runner)
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


def test_every_figure_is_timed_warm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short call right after a call of another shape runs slow until calls like it have run a while (on
    the Intel Xeon VMs a 1-row step after a 256-row prompt call took 5 ms, then 2.7 ms from about the 7th
    call). Timed cold, the one-row step is promised at twice its cost and above the two-row step."""
    runner = DriftingRunner(cold=True)
    monkeypatch.setattr(probe, "time", runner)
    c = calibrate(runner, SLOTS, CTX, torch.device("cpu"), CHUNK)
    for live in range(1, SLOTS + 1):
        assert abs(c.step_ms[live] / expected_step(live, 64) - 1) < 0.1, (live, c.step_ms)
    assert c.step_ms[1] < c.step_ms[2], c.step_ms
    per_row = 1 + (256 + (CHUNK - 1) / 2) / 1024
    assert abs(c.prompt_row_ms / per_row - 1) < 0.1, c.prompt_row_ms


class BoundedRunner(DriftingRunner):
    """A runner whose cache holds `ctx` positions, as a plan's does: a row past it is an error (the real
    plan's rotary table raised IndexError)."""

    def __init__(self, ctx: int) -> None:
        super().__init__()
        self.ctx = ctx

    def decode(self, slots, tokens, positions, logit_rows=None):
        if max(positions) >= self.ctx:
            raise IndexError(f"position {max(positions)} past a {self.ctx}-position cache")
        return super().decode(slots, tokens, positions, logit_rows)


@pytest.mark.parametrize("chunk", [63, 64, 4096])
def test_a_prompt_chunk_larger_than_the_context_is_timed_as_what_fits(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    # `--prefill-chunk 4096 --ctx 3200` failed at compile: the calibration asked for rows 0..4095
    ctx = 64
    runner = BoundedRunner(ctx)
    monkeypatch.setattr(probe, "time", runner)
    c = calibrate(runner, SLOTS, ctx, torch.device("cpu"), chunk)
    assert c.prompt_row_ms > 0
    first, _, far = probe.prompt_row_positions(ctx, chunk)
    assert far + (min(chunk, ctx - 1) - 1) / 2 <= ctx - 1  # the rows the price assumes fit the cache too
    assert first <= far

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


class ClockedCalls:
    """A call that costs `ms` on a virtual clock, counted."""

    def __init__(self, ms: float) -> None:
        self.ms, self.now, self.calls = ms, 0.0, 0

    def perf_counter(self) -> float:
        return self.now

    def __call__(self) -> None:
        self.calls += 1
        self.now += self.ms / 1000


def test_a_warm_up_stops_once_it_has_run_for_warm_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = ClockedCalls(30.0)  # 2 untimed calls reach WARM_MS = 50 ms
    monkeypatch.setattr(probe, "time", slow)
    assert probe.time_warm(slow, torch.device("cpu"), calls=1) == [30.0]
    assert slow.calls == 2 + 1
    fast = ClockedCalls(1.0)  # at most WARM_CALLS untimed calls, whatever they cost
    monkeypatch.setattr(probe, "time", fast)
    assert len(probe.time_warm(fast, torch.device("cpu"), calls=2)) == 2
    assert fast.calls == probe.WARM_CALLS + 2
    with pytest.raises(ValueError, match="calls=0"):
        probe.time_warm(fast, torch.device("cpu"), calls=0)


def test_the_prompt_rows_positions_are_the_mean_positions_of_the_rows_timed() -> None:
    # chunk 8 rows from position 256 (first), from 1024 (far); the alone prompt is rows 0..255
    assert probe.prompt_row_positions(2048, 8) == (256 + 3.5, 127.5, 1024 + 3.5)
    assert probe.calibrated_chunk(64, 4096) == 63  # a prompt is at most ctx - 1 rows
    assert [far_position(ctx) for ctx in (66, 512, 4096)] == [65, 511, 1024]  # a position the cache holds


def test_one_slot_has_no_prompt_rows_beside_decode_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = DriftingRunner()
    monkeypatch.setattr(probe, "time", runner)
    c = calibrate(runner, 1, CTX, torch.device("cpu"), CHUNK)
    assert set(c.step_ms) == {1} and c.prompt_row_ms != c.prompt_row_ms  # NaN: nothing to mix with


class ProbedRunner:
    """Logits (rows, 3) from each row's (slot, token, position), plus `shift` where several rows share the batch
    (a kernel whose bits change with the row count); a row past `ctx` is an error, as in a plan's cache."""

    def __init__(self, ctx: int, shift: float = 0.0, value: float = 0.0) -> None:
        self.ctx, self.shift, self.value = ctx, shift, value
        self.decode_mode = "fixed"
        self.seen: list[tuple[str, int]] = []

    def decode(self, slots, tokens, positions, logit_rows=None):
        if max(positions) >= self.ctx:
            raise IndexError(f"position {max(positions)} past a {self.ctx}-position cache")
        self.seen.append((self.decode_mode, len(slots)))
        rows = torch.tensor([[s, t, p] for s, t, p in zip(slots, tokens, positions)], dtype=torch.float32)
        return rows + self.value + (self.shift if len(slots) > 1 else 0.0)


def test_the_probe_picks_compact_rows_only_where_each_row_is_bitwise_the_same_alone() -> None:
    cfg = type("Cfg", (), {"vocab_size": 50})()  # the probe reads the vocabulary size only
    same = ProbedRunner(ctx=8)
    assert probe.choose_decode_mode(same, cfg, 4, 8)[0] == "compact" and same.decode_mode == "compact"
    assert same.seen == [("compact", 4)] + [("compact", 1)] * 4  # every row checked alone, within ctx 8
    differs = ProbedRunner(ctx=8, shift=1e-6)
    mode, why = probe.choose_decode_mode(differs, cfg, 4, 8)
    assert mode == "fixed" == differs.decode_mode and "slot 0" in why
    with pytest.raises(probe.NonFiniteLogits, match="NaN or infinite"):
        probe.choose_decode_mode(ProbedRunner(ctx=8, value=float("nan")), cfg, 4, 8)


def test_step_times_that_do_not_hold_together_are_named() -> None:
    """More live slots timed faster than fewer, or a step deep into the context faster than near its start,
    beyond 20 % and half a millisecond of noise: the figures of a plan calibrated beside another process."""
    quiet = {1: 3.8, 2: 3.8, 3: 4.6, 4: 5.6, 5: 5.7, 6: 6.5, 7: 7.2, 8: 8.1}  # a quiet VM, 2026-12-07
    far = {1: 5.6, 2: 7.4, 3: 9.0, 4: 10.6, 5: 12.6, 6: 14.5, 7: 16.5, 8: 18.6}
    assert probe.calibration_problem(quiet, far) is None
    contended = {1: 20.4, 2: 20.9, 3: 20.8, 4: 22.5, 5: 22.0, 6: 22.9, 7: 7.6, 8: 7.7}  # 2026-12-08
    said = probe.calibration_problem(contended, {k: v * 1.1 for k, v in contended.items()})
    assert said == "7 live slots timed 7.6 ms a step and 1 20.4 ms (near the context's start)"
    assert "(deep into the context)" in probe.calibration_problem(quiet, {**far, 2: 3.0})
    said = probe.calibration_problem(quiet, {k: v / 2 for k, v in quiet.items()})
    assert said == "1 live slots timed 1.9 ms a step deep into the context and 3.8 ms near its start"
    tiny = {1: 0.30, 2: 0.21}  # a test model's sub-millisecond steps: noise, not a contended machine
    assert probe.calibration_problem(tiny, tiny) is None


class ContendedRunner(DriftingRunner):
    """A DriftingRunner whose steps of fewer than all slots take five times as long during its first
    `contended` calibrations (another process's pinned threads on these cores), then run as they should."""

    def __init__(self, contended: int) -> None:
        super().__init__()
        self.contended, self.calibrations = contended, 0

    def decode(self, slots, tokens, positions, logit_rows=None):
        factor = 5.0 if self.calibrations < self.contended and len(slots) < SLOTS else 1.0
        self._spend(factor * (2 + len(slots) + sum(positions) / 1024), ("decode", len(slots), positions[-1]))


def _counting_calibrate(monkeypatch: pytest.MonkeyPatch, runner: ContendedRunner) -> None:
    real = probe.calibrate

    def counted(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        finally:
            runner.calibrations += 1

    monkeypatch.setattr(probe, "calibrate", counted)
    monkeypatch.setattr(probe, "time", runner)  # calibration's clock: the runner's virtual one


def test_a_calibration_that_does_not_hold_together_is_taken_again(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ContendedRunner(contended=1)
    _counting_calibrate(monkeypatch, runner)
    said: list[str] = []
    c, problem = probe.calibrate_consistent(runner, SLOTS, CTX, torch.device("cpu"), CHUNK, said.append)
    assert problem is None and runner.calibrations == 2
    assert c.step_ms[1] == pytest.approx(expected_step(1, probe.NEAR_POSITION))
    assert len(said) == 1 and said[0].startswith("calibrating again: 2 live slots timed")


def test_a_calibration_that_never_holds_together_is_returned_with_its_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ContendedRunner(contended=probe.CALIBRATION_TRIES)
    _counting_calibrate(monkeypatch, runner)
    c, problem = probe.calibrate_consistent(runner, SLOTS, CTX, torch.device("cpu"), CHUNK, lambda _m: None)
    assert runner.calibrations == probe.CALIBRATION_TRIES and problem is not None and "2 live slots" in problem
    assert c.step_ms[1] > c.step_ms[2]

"""How fast this machine runs the plan now, against the plan's calibration.

The plan prices a step from figures it timed when it was compiled (compile/probe.py), and the engine
promises each request a TTFT from those prices. A shared VM's speed drifts: on the 2-core Xeon the same
plan ran its one-row step at 0.7x its calibration an hour after the calibration was taken, and every
promise was then short by that much (docs/performance.md, "The promise at the machine's pace"). So the
engine keeps what its recent steps took against what the plan priced them at, and its promises are the
plan's prices times the median of those ratios.

The median of a window, not a mean: one step that waited for a garbage collection or a page fault must not
move every promise after it, and a lasting change of the machine's speed moves it within half a window.
"""

from __future__ import annotations

import statistics

WINDOW = 32  # the steps the pace is the median of
LEAST = 8  # fewer priced steps than this: the plan's prices as they are (a pace of 1)


class Pace:
    """The median of measured ÷ priced over the last `window` priced steps; 1 until `least` have run.

    `record` runs on the stepping thread and `factor` on any thread (a submit): the ratios are a tuple,
    replaced whole by each record, so a reader never sees one being changed."""

    def __init__(self, window: int = WINDOW, least: int = LEAST) -> None:
        if window < 1 or not 1 <= least <= window:
            raise ValueError(f"window ({window}) must be at least 1 and least ({least}) within [1, window]")
        self.window, self.least = window, least
        self._ratios: tuple[float, ...] = ()

    def record(self, priced_ms: float, measured_ms: float) -> None:
        """One step the plan priced at `priced_ms` took `measured_ms`. A step without a positive price
        (an uncalibrated plan's NaN, a zero) or time says nothing about the pace and is not kept: the pace
        stays above 0, as the engine divides by it."""
        if priced_ms > 0 and measured_ms > 0:  # False for NaN as well
            self._ratios = (*self._ratios, measured_ms / priced_ms)[-self.window :]

    @property
    def steps(self) -> int:
        """How many priced steps the pace is taken over now (at most `window`)."""
        return len(self._ratios)

    @property
    def factor(self) -> float:
        """What to multiply the plan's prices by: how much longer (above 1) or shorter a step takes now."""
        ratios = self._ratios
        return statistics.median(ratios) if len(ratios) >= self.least else 1.0


class PaceByRows:
    """A Pace for each number of decode rows, over the steps that ran no prompt rows (a lone user's drafts,
    priced as more rows of its slot, included): what a decoding user's next token costs at that load now,
    against the plan's price for it.

    One pace for every step mixes loads whose calibrations are off by different amounts: on the 2-core Xeon,
    with speeds promised from the overall pace, one user got 1.14-1.20x its promise and each of eight users
    0.77-0.79x (2026-12-07; docs/performance.md, "A decode speed promised with the first token"). Used by
    one thread (the engine's stepping thread records and reads it)."""

    def __init__(self, window: int = WINDOW, least: int = LEAST) -> None:
        self.window, self.least = window, least
        self._by_rows: dict[int, Pace] = {}

    def record(self, rows: int, priced_ms: float, measured_ms: float) -> None:
        """A step of `rows` decode rows (their drafts priced with them) and no prompt rows, priced `priced_ms`,
        took `measured_ms`."""
        self._by_rows.setdefault(rows, Pace(self.window, self.least)).record(priced_ms, measured_ms)

    def factor(self, rows: int, otherwise: float) -> float:
        """The pace of steps of `rows` decode rows, once `least` of them have run; until then `otherwise`."""
        pace = self._by_rows.get(rows)
        return pace.factor if pace is not None and pace.steps >= pace.least else otherwise

"""Where a step's time goes: the engine stamps each phase of every step, and `StepProfile` sums them.

The phases follow the step (engine.py): schedule (slots, cancellations), draft (speculation's guesses),
plan (the compiled model: every row of the step in one call), sample (penalties, masks, the token, logprobs),
emit (stop checks, detokenization, handing events to their callbacks). Whatever the engine thread does
outside a step (waiting for work, the GIL held by other threads) is not a phase: `wall_s` minus the phases'
sum shows it. The serving layer adds its own share (HTTP, SSE) by comparing its clients' clock with these.

Stamping costs two perf_counter calls per phase per step (well under 1 µs each), so it is always on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

PHASES = ("schedule", "draft", "plan", "sample", "emit")


@dataclass
class StepProfile:
    """Running sums since the engine started (or since `reset`): seconds per phase, steps, rows, tokens."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0
    decode_rows: int = 0  # rows of requests past their prompt (drafts included)
    prompt_rows: int = 0  # prompt tokens run as rows
    tokens: int = 0  # tokens sampled and emitted
    started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds  # only the stepping thread writes; readers take a snapshot

    def snapshot(self) -> "StepProfile":
        with self._lock:
            return StepProfile(
                dict(self.seconds), self.steps, self.decode_rows, self.prompt_rows, self.tokens, self.started
            )

    def reset(self) -> None:
        with self._lock:
            self.seconds = dict.fromkeys(PHASES, 0.0)
            self.steps = self.decode_rows = self.prompt_rows = self.tokens = 0
            self.started = time.perf_counter()

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def busy_s(self) -> float:
        return sum(self.seconds.values())

    def table(self) -> str:
        """A plain-text breakdown: each phase's share of the busy time and its cost per step and per token."""
        busy = self.busy_s or 1e-12
        lines = [f"{'phase':<10} {'share':>7} {'ms/step':>9} {'µs/token':>9}"]
        for phase in PHASES:
            s = self.seconds[phase]
            lines.append(
                f"{phase:<10} {100 * s / busy:6.1f}% {1000 * s / max(1, self.steps):9.3f} "
                f"{1e6 * s / max(1, self.tokens):9.1f}"
            )
        lines.append(
            f"{self.steps} steps, {self.tokens} tokens, {self.decode_rows} decode rows, "
            f"{self.prompt_rows} prompt rows; busy {busy:.2f} s of {self.wall_s:.2f} s on the engine thread"
        )
        return "\n".join(lines)


class PhaseClock:
    """Stamps consecutive phases of one step: `lap("plan")` charges the time since the last lap to "plan"."""

    __slots__ = ("profile", "last")

    def __init__(self, profile: StepProfile) -> None:
        self.profile = profile
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.profile.add(phase, now - self.last)
        self.last = now
